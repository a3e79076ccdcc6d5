"""RunRecord: what one run leaves behind in the results store; and the code version it ran."""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal

import torch

from randmask import __version__
from randmask.ops import weight_gradient_kernel
from randmask_lab.errors import RunError
from randmask_lab.experiment.results.source_manifest import (
    MANIFEST_ENV,
    has_uncommitted_changes,
    manifest_version,
    run_git,
)

Status = Literal["done", "diverged", "scale_collapsed", "failed"]
# A sweep skips these (rerunning gives the same result); "failed" runs are retried.
# scale_collapsed: a 16-mixed run whose fp16 loss scale collapsed (not a divergence of the model).
FINISHED: tuple[str, ...] = ("done", "diverged", "scale_collapsed")
RESUMED_NOTE = "resumed from the checkpoint at step {step}"
_RESUMED = re.compile(RESUMED_NOTE.format(step=r"(\d+)"))


@dataclass
class RunRecord:
    """One run: its config, per-epoch metrics, the best epoch's test metric, counts, time, status."""

    run_id: str
    config: dict[str, Any]
    status: Status
    metric: str  # "accuracy" or "f1"
    epochs: list[dict[str, Any]] = field(default_factory=list)  # epoch, train_loss, val_loss, val_metric, ...
    best_epoch: int | None = None
    val_loss: float | None = None  # of the best epoch
    val_metric: float | None = None
    test_metric: float | None = None
    trainable: int = 0
    total: int = 0
    trainable_report: dict[str, Any] = field(default_factory=dict)
    wall_seconds: float = 0.0
    train_seconds: float = 0.0
    cpu_seconds: float | None = None  # this process's CPU time for the run (all threads): unlike wall time, not
    # inflated by a pause (kill -STOP) or a machine shared with other work; None in records made before it
    # wall_seconds and cpu_seconds are the finishing attempt's. A run resumed from a checkpoint also carries the
    # time its earlier attempts spent up to that checkpoint (their work after it is lost); None before this field.
    carried_seconds: float | None = None
    carried_cpu_seconds: float | None = None
    code_version: dict[str, Any] = field(default_factory=dict)  # the code of the attempt that finished the run
    # A run resumed from a checkpoint under other code (a checkout moved on between sessions): the versions its
    # earlier attempts ran, oldest first. Empty when every attempt ran ``code_version`` (or made before this field).
    earlier_code_versions: list[dict[str, Any]] = field(default_factory=list)
    created: str = ""
    error: str | None = None
    notes: list[str] = field(default_factory=list)  # data-sampling notes, method notes
    data: dict[str, Any] = field(default_factory=dict)  # where each split came from + the data fingerprint
    attention: str = ""  # the SDPA backend choice the precision made (see experiment/compute/precision.py)
    # The machine the times above were measured on (randmask_lab.machine.machine_info: CPU model, torch CPU
    # capability, native bf16, device); empty in records made before it was kept.
    machine: dict[str, Any] = field(default_factory=dict)
    run_dir: str = ""

    @property
    def resumed_at(self) -> int | None:
        """The global step of the checkpoint this run resumed from (None: it ran in one attempt)."""
        found = next((m for m in map(_RESUMED.fullmatch, self.notes) if m), None)
        return int(found.group(1)) if found else None

    @property
    def compute_seconds(self) -> float:
        """Wall time of the whole run: the finishing attempt's plus what earlier ones carried in.

        A record made before ``carried_seconds`` existed takes the carried time from its own history: the
        cumulative training time at the last epoch end at or before the step it resumed from (a lower bound
        should that checkpoint lie mid-epoch)."""
        if self.carried_seconds is not None:
            return self.wall_seconds + self.carried_seconds
        step = self.resumed_at
        if step is None:
            return self.wall_seconds
        reached = [h.get("seconds", 0.0) for h in self.epochs if h.get("steps") is not None and h["steps"] <= step]
        return self.wall_seconds + (max(reached) if reached else 0.0)

    @property
    def compute_cpu_seconds(self) -> float | None:
        """CPU time of the whole run, like ``compute_seconds`` (None in records made before CPU time was kept;
        a resumed record made before ``carried_cpu_seconds`` counts its finishing attempt only)."""
        if self.cpu_seconds is None:
            return None
        return self.cpu_seconds + (self.carried_cpu_seconds or 0.0)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunRecord:
        """Inverse of ``to_dict`` (unknown keys from newer versions are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


# What "dirty" looks at: the code a run executes. A study's own exported results file (tracked, rewritten
# after every run) and the README are not code, and made 121 of the first study's 176 records "dirty".
CODE_PATHS = ("src", "pyproject.toml")


def code_version(device: str | torch.device = "cpu") -> dict[str, Any]:
    """The package version, the git commit (+ whether the code under it, ``CODE_PATHS``, has uncommitted
    changes) when run from a checkout, and the weight-gradient kernel a run on ``device`` uses (the compiled
    one on a CPU where a C compiler exists: same math, another summation order)."""
    return {**source_version(), "sddmm_kernel": weight_gradient_kernel(device)}


def source_folder() -> Path:
    """The folder that holds the ``randmask_lab`` package this process runs (a checkout's src/, or
    site-packages), found from the package itself, not from any module's depth, so moving a module cannot
    change it."""
    import randmask_lab  # the package itself (already imported: this module is inside it)

    return Path(randmask_lab.__file__).resolve().parent.parent


def checkout_root() -> Path | None:
    """The git checkout this package runs from (the folder holding ``src/randmask_lab`` and ``.git``, a
    folder or a worktree's file), or None for an installed copy."""
    src = source_folder()
    root = src.parent
    if src.name != "src" or not (root / ".git").exists() or not (root / "pyproject.toml").is_file():
        return None
    return root


@cache
def source_version() -> dict[str, Any]:
    """``{"package", "commit", "dirty"}`` of the code this process runs. Outside a git checkout, commit and dirty
    come from the source manifest that ``$RANDMASK_SOURCE_MANIFEST`` names (a copy of a checkout without its .git,
    on a lent GPU machine: ``source_manifest``), else they are None (an installed wheel: the package version is
    then the provenance). Read once per process."""
    root = checkout_root()
    out: dict[str, Any] = {"package": __version__, "commit": None, "dirty": None}
    if root is None:
        manifest = os.environ.get(MANIFEST_ENV)
        if manifest:
            if source_folder().name != "src":
                raise RunError(f"{MANIFEST_ENV} is set, but randmask_lab runs from {source_folder()}, not from a copy "
                               "of a checkout's src/: the manifest cannot name its commit; unset it")
            out.update(manifest_version(source_folder().parent, Path(manifest)))
        return out
    try:
        out["commit"] = run_git(root, "rev-parse", "HEAD", timeout=10).strip()
    except RunError:
        return out  # not a commit yet, or no git: the package version is the provenance
    try:
        out["dirty"] = has_uncommitted_changes(root, CODE_PATHS, timeout=10)
    except RunError:
        pass
    return out
