"""RunRecord: what one run leaves behind in the results store; and the code version it ran."""

from __future__ import annotations

import dataclasses
import subprocess
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal

import torch

from randmask import __version__
from randmask.ops import weight_gradient_kernel

Status = Literal["done", "diverged", "scale_collapsed", "failed"]
# A sweep skips these (rerunning gives the same result); "failed" runs are retried.
# scale_collapsed: a 16-mixed run whose fp16 loss scale collapsed (not a divergence of the model).
FINISHED: tuple[str, ...] = ("done", "diverged", "scale_collapsed")


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
    code_version: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    error: str | None = None
    notes: list[str] = field(default_factory=list)  # data-sampling notes, method notes
    data: dict[str, Any] = field(default_factory=dict)  # where each split came from + the data fingerprint
    attention: str = ""  # the SDPA backend choice the precision made (see experiment/precision.py)
    run_dir: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunRecord:
        """Inverse of ``to_dict`` (unknown keys from newer versions are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def code_version(device: str | torch.device = "cpu") -> dict[str, Any]:
    """The package version, the git commit (+ whether the tree is dirty) when run from a checkout, and the
    weight-gradient kernel a run on ``device`` uses (the compiled one on a CPU where a C compiler exists: same
    math, another summation order)."""
    return {**_source_version(), "sddmm_kernel": weight_gradient_kernel(device)}


@cache
def _source_version() -> dict[str, Any]:
    root = Path(__file__).resolve().parents[3]
    out: dict[str, Any] = {"package": __version__, "commit": None, "dirty": None}
    if not (root / ".git").exists():
        return out
    try:
        git = lambda *a: subprocess.run(["git", "-C", str(root), *a], capture_output=True, text=True,
                                        timeout=10)
        head = git("rev-parse", "HEAD")
        if head.returncode == 0:
            out["commit"] = head.stdout.strip()
            status = git("status", "--porcelain", "--untracked-files=no")
            out["dirty"] = bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return out
