"""A checkpoint's ``state.json``: the training state it carries (``TrainState``) and the checks of a header read back.

Every field is checked for type and range before anything is loaded, so a damaged or crafted header is one line
naming the problem (``checkpoint.load_checkpoint`` turns it into a RunError with the fix), never a traceback.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from typing import Any

# A checkpoint names its tensor files by role; each is a plain file name inside the checkpoint folder.
FILE_ROLES = ("trainable", "optimizer", "method", "best")
FILE_NAME = re.compile(r"[A-Za-z0-9_.-]+\.safetensors")


@dataclass
class TrainState:
    """Where a run is: counters, per-epoch history, best epoch so far."""

    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # steps of the current epoch already taken
    global_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int | None = None
    best_score: float | None = None  # lower is better (val loss, or minus the val metric)
    loss_sum: float = 0.0  # this epoch's training loss so far
    loss_count: int = 0
    # Time (wall; CPU, all threads) of earlier attempts up to the checkpoint this attempt resumed from, 0 on a
    # fresh start: a checkpoint saves the running total and restores these, so they stay the carried-in time.
    train_seconds: float = 0.0
    cpu_seconds: float = 0.0
    # ``code_version`` of each attempt so far, oldest first, one entry per change: a run resumed under other code
    # (a checkout moved between sessions) names every version it ran, not only the one it finished under.
    code_versions: list[dict[str, Any]] = field(default_factory=list)


def header_problem(header: Any, sharded_roles: frozenset[str] = frozenset()) -> str | None:
    """What makes ``header`` not a checkpoint header this code wrote (types and ranges), or None. ``sharded_roles``:
    the roles a sharded checkpoint keeps in per-rank parts (``shards``), not in ``files``."""
    if not isinstance(header, dict) or not {"run_id", "files", "state", "optimizer", "rng"} <= set(header):
        return "not a checkpoint header: it lacks the keys a checkpoint has"
    files, optimizer, rng = header["files"], header["optimizer"], header["rng"]
    if not isinstance(header["run_id"], str) or not isinstance(files, dict):
        return "run_id or files has the wrong type"
    if not {"trainable", "optimizer", "method"} - sharded_roles <= set(files) or not set(files) <= set(FILE_ROLES):
        return f"its file list {sorted(files)[:5]} is not {list(FILE_ROLES)}"
    bad = [v for v in files.values() if not (isinstance(v, str) and FILE_NAME.fullmatch(v))]
    if bad:  # e.g. "/dev/zero" or "../x": a checkpoint's files lie in its own folder
        return f"it names {str(bad[0])[:60]!r}, not a .safetensors file name in the checkpoint folder"
    if not (isinstance(optimizer, dict) and isinstance(optimizer.get("param_groups"), list)
            and isinstance(optimizer.get("scalars"), dict)):
        return "its optimizer state is not {param_groups: [...], scalars: {...}}"
    if not (isinstance(rng, dict) and isinstance(rng.get("torch"), str)) or not isinstance(header.get("method"),
                                                                                          (dict, type(None))):
        return "its RNG or method state has the wrong type"
    scaler, sha256 = header.get("scaler"), header.get("sha256", {})  # sha256: absent in checkpoints before it
    if scaler is not None and not (isinstance(scaler, dict) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
            for k, v in scaler.items() if k != "_growth_tracker")):
        return "its loss-scaler state is not an object of positive numbers"
    if not (isinstance(sha256, dict) and all(isinstance(v, str) for v in sha256.values())):
        return "its file checksums are not an object of SHA-256 digests"
    return _state_problem(header["state"])


def _epoch_record(entry: Any) -> bool:
    """An epoch of the history: its number, and numbers (finite), strings or nulls for the rest."""
    return (isinstance(entry, dict) and isinstance(entry.get("epoch"), int) and not isinstance(entry["epoch"], bool)
            and all(v is None or isinstance(v, str) or (isinstance(v, (int, float)) and math.isfinite(v))
                    for v in entry.values()))


def _state_problem(state: Any) -> str | None:
    """Types and ranges of TrainState's fields (a negative step would divide by zero in the LR schedule)."""
    if not isinstance(state, dict) or set(state) - {f.name for f in fields(TrainState)}:
        return "its training state is not a TrainState"
    count = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0  # noqa: E731
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
    for key in ("epoch", "step_in_epoch", "global_step", "loss_count"):
        if key in state and not count(state[key]):
            return f"state.{key} = {str(state[key])[:40]!r} is not a count >= 0"
    for key in ("loss_sum", "train_seconds", "cpu_seconds"):
        if key in state and not (number(state[key]) and (key == "loss_sum" or state[key] >= 0)):
            return f"state.{key} = {str(state[key])[:40]!r} is not a finite number"
    if state.get("best_epoch") is not None and not count(state["best_epoch"]):
        return "state.best_epoch is not a count >= 0"
    if state.get("best_score") is not None and not number(state["best_score"]):
        return "state.best_score is not a finite number"
    history = state.get("history", [])
    if not (isinstance(history, list) and all(_epoch_record(h) for h in history)):
        return "state.history is not a list of epoch records"
    versions = state.get("code_versions", [])
    if not (isinstance(versions, list) and all(code_version_ok(v) for v in versions)):
        return "state.code_versions is not a list of code versions"
    return None


def code_version_ok(version: Any) -> bool:
    """A ``code_version`` object: strings, booleans and nulls (package, commit, dirty, kernel)."""
    return isinstance(version, dict) and all(isinstance(k, str) and (v is None or isinstance(v, (str, bool)))
                                             for k, v in version.items())
