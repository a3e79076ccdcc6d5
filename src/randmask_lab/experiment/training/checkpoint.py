"""Resumable checkpoints: safetensors + JSON only, never pickles, written atomically.

A checkpoint folder holds ``state.json`` (epoch, step, RNG state, history, optimizer
hyper-parameters) and the safetensors files it names: the trainable tensors, the optimizer state
tensors flattened to ``state.<param index>.<key>``, the best epoch's trainable tensors, and
method state (``PreparedModel.method_state``: AdaLoRA's importance scores) and the fp16
loss scaler's state. Tensor files carry the step in their name and
``state.json`` is replaced last, so a kill at any moment leaves the previous checkpoint whole.
"""

from __future__ import annotations

import base64
import hashlib
import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from randmask import MaskingError, read_json_limited, read_limited
from randmask_lab.errors import RunError
from randmask_lab.fs import make_folder, write_json
from randmask_lab.methods import PreparedModel
from randmask_lab.methods.trainable import (
    full_tensor,
    like_param,
    load_trainable,
    read_tensors,
    tensor_file_limit,
    trainable_tensors,
    write_tensors,
)

STATE = "state.json"
MAX_STATE_BYTES = 64 << 20  # counters, per-epoch history, RNG state, optimizer scalars: a few KB in practice
# A checkpoint names its tensor files by role; each is a plain file name inside the checkpoint folder.
FILE_ROLES = ("trainable", "optimizer", "method", "best")
_FILE_NAME = re.compile(r"[A-Za-z0-9_.-]+\.safetensors")
# Copies per trainable entry a file of each role may hold: AdamW keeps two moments (+ a step); AdaLoRA's method
# state keeps three importance statistics per entry.
_COPIES = {"trainable": 1, "optimizer": 3, "method": 4, "best": 1}


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


def _flatten_optimizer(optimizer: torch.optim.Optimizer, keep: bool = True
                       ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The optimizer's per-parameter tensors by ``state.<index>.<key>`` (whole: a sharded moment is gathered, a
    collective; ``keep=False`` drops each at once, as ``trainable_tensors`` does), and its groups and scalars."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    # Sorted: every rank of a sharded run gathers the same tensor at the same call. A loaded state's order is the
    # file's as safetensors returned it, which differs between processes (it comes from a hash map).
    for idx in sorted(sd["state"]):
        entry = sd["state"][idx]
        for key in sorted(entry):
            value = entry[key]
            if isinstance(value, torch.Tensor):
                whole = full_tensor(value.detach())
                if keep:
                    tensors[f"state.{idx}.{key}"] = whole.cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                         optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The state dict to load: the checkpoint's per-parameter state, checked against the optimizer's parameters,
    under the optimizer's own groups. The groups' hyperparameters come from the run's config (its id fixes them;
    ``set_lr`` sets each step's lr), so an edited lr, betas or eps in the file cannot take effect."""
    current = optimizer.state_dict()["param_groups"]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    saved = meta["param_groups"]
    if len(saved) != len(current) or any(not isinstance(g, dict) or not isinstance(g.get("params"), list)
                                         or len(g["params"]) != len(c["params"]) for g, c in zip(saved, current)):
        raise ValueError("its optimizer parameter groups do not match this run's")
    state: dict[int, dict[str, Any]] = {}

    def slot(index: str, name: str) -> dict[str, Any]:
        i = int(index)
        if not 0 <= i < len(params):
            raise ValueError(f"optimizer state {name} names parameter {i} of {len(params)}")
        return state.setdefault(i, {})

    for name, t in tensors.items():  # in safetensors' order, which differs between processes: no collective here
        _, index, key = name.split(".", 2)
        into = slot(index, name)
        param = params[int(index)]
        if t.numel() != 1 and tuple(t.shape) != tuple(param.shape):
            raise ValueError(f"optimizer state {name} has shape {tuple(t.shape)}, its parameter "
                             f"{tuple(param.shape)}")
        # A moment (the parameter's shape; never the step, which torch keeps in fp32 whatever the parameter's dtype)
        # of a sharded (FSDP2) parameter: this rank's shard of it, as the optimizer keeps it.
        into[key] = like_param(param, t) if key != "step" and tuple(t.shape) == tuple(param.shape) else t
    for name, value in meta["scalars"].items():
        index, key = name.split(".", 1)
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)):
            raise ValueError(f"optimizer scalar {name} = {str(value)[:30]!r} is not a finite number")
        slot(index, name)[key] = value
    return {"state": state, "param_groups": current}


def _rng_state() -> dict[str, str]:
    out = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available():
        out["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return out


def _set_rng_state(saved: dict[str, str]) -> None:
    decode = lambda s: torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)
    torch.set_rng_state(decode(saved["torch"]))
    if "cuda" in saved and torch.cuda.is_available():
        torch.cuda.set_rng_state(decode(saved["cuda"]))


def save_checkpoint(folder: Path, state: TrainState, prepared: PreparedModel, optimizer: torch.optim.Optimizer,
                    best: dict[str, torch.Tensor] | None, run_id: str,
                    scaler: torch.amp.GradScaler | None = None, write: bool = True) -> None:
    """Write a checkpoint of the run at ``state``: by one rank of a replicated run; by every rank of a sharded
    (FSDP2) one, which gathers the sharded tensors (collectives) while only the rank with ``write`` writes; the
    other ranks drop each gathered tensor at once (their peak is one whole tensor, not a copy of the model and its
    Adam moments)."""
    trainable = trainable_tensors(prepared.model, keep=write)
    opt_tensors, opt_meta = _flatten_optimizer(optimizer, keep=write)
    if not write:
        return
    make_folder(folder)
    m_tensors, m_meta = prepared.method_state()
    tag = f"{state.global_step:08d}"
    files = {"trainable": f"trainable-{tag}.safetensors", "optimizer": f"optimizer-{tag}.safetensors",
             "method": f"method-{tag}.safetensors"}
    sha256 = {files["trainable"]: write_tensors(folder / files["trainable"], trainable),
              files["optimizer"]: write_tensors(folder / files["optimizer"], opt_tensors),
              files["method"]: write_tensors(folder / files["method"], m_tensors)}
    if best is not None:
        files["best"] = f"best-epoch{state.best_epoch}.safetensors"
        if (folder / files["best"]).is_file():  # written at that epoch's end, unchanged since
            blob = read_limited(folder / files["best"], tensor_file_limit(prepared.model), "tensor file",
                                error=ValueError)
            sha256[files["best"]] = hashlib.sha256(blob).hexdigest()
        else:
            sha256[files["best"]] = write_tensors(folder / files["best"], best)
    header = {"run_id": run_id, "files": files, "sha256": sha256, "state": asdict(state), "optimizer": opt_meta,
              "method": m_meta, "rng": _rng_state(), "scaler": scaler.state_dict() if scaler is not None else None}
    write_json(folder / STATE, header)
    for old in folder.glob("*.safetensors"):  # files of older checkpoints
        if old.name not in files.values():
            old.unlink(missing_ok=True)


def _damaged(path: Path, why: str) -> RunError:
    return RunError(f"the checkpoint {path} is damaged ({why}); run the same command with --restart to discard "
                    "it and start the run over")


def check_counters(state: TrainState, folder: Path, epochs: int, steps_per_epoch: int) -> None:
    """RunError when a loaded state's counters lie outside the run it resumes (``epochs`` of ``steps_per_epoch``
    steps): the header's schema passed, but resumed, the run would end early and be recorded as done."""
    why = None
    if state.epoch > epochs:
        why = f"state.epoch = {state.epoch} is past this run's {epochs} epochs"
    elif state.step_in_epoch > steps_per_epoch or (state.epoch == epochs and state.step_in_epoch):
        why = f"state.step_in_epoch = {state.step_in_epoch} is past an epoch's {steps_per_epoch} steps"
    elif state.global_step > epochs * steps_per_epoch:
        why = f"state.global_step = {state.global_step} is past this run's {epochs * steps_per_epoch} steps"
    elif any(h["epoch"] > state.epoch for h in state.history):
        why = f"state.history has an epoch past the {state.epoch} completed"
    if why:
        raise _damaged(folder / STATE, why)


def load_checkpoint(folder: Path, prepared: PreparedModel, optimizer: torch.optim.Optimizer, run_id: str,
                    scaler: torch.amp.GradScaler | None = None
                    ) -> tuple[TrainState, dict[str, torch.Tensor] | None] | None:
    """Restore model, optimizer, method, scaler and RNG state; (state, best tensors), or None if absent.

    A damaged checkpoint (truncated JSON, missing or corrupt tensor file, tensors that do not fit)
    is a RunError that names it and the fix (--restart).
    """
    path = folder / STATE
    if not path.exists() and not path.is_symlink():
        return None
    try:
        header = read_json_limited(path, MAX_STATE_BYTES, "checkpoint header")
    except MaskingError as e:
        raise _damaged(path, f"not a checkpoint header: {e}") from None
    problem = _header_problem(header)
    if problem:
        raise _damaged(path, problem)
    if header["run_id"] != run_id:
        raise RunError(f"{path} belongs to run {header['run_id']!r}, not {run_id!r}; run with --restart to discard it")
    try:
        read = lambda key: read_tensors(folder / header["files"][key], tensor_file_limit(prepared.model, _COPIES[key]),
                                        sha256=header.get("sha256", {}).get(header["files"][key]))
        load_trainable(prepared.model, read("trainable"), source=str(folder / header["files"]["trainable"]))
        optimizer.load_state_dict(_unflatten_optimizer(read("optimizer"), header["optimizer"], optimizer))
        prepared.restore_method_state(read("method"), header.get("method") or {})
        best = read("best") if "best" in header["files"] else None
        state = TrainState(**header["state"])
        if scaler is not None and header.get("scaler"):
            scaler.load_state_dict(header["scaler"])
        _set_rng_state(header["rng"])
    # A header that passed the schema can still hold values torch refuses (a wrong RNG state size, optimizer
    # groups that do not fit): any of them means the checkpoint is damaged, never a traceback.
    except (ValueError, KeyError, TypeError, RuntimeError, AttributeError, IndexError, OverflowError) as e:
        raise _damaged(path, " ".join(str(e).split())[:300]) from None
    return state, best


def _header_problem(header: Any) -> str | None:
    """What makes ``header`` not a checkpoint header this code wrote (types and ranges), or None."""
    if not isinstance(header, dict) or not {"run_id", "files", "state", "optimizer", "rng"} <= set(header):
        return "not a checkpoint header: it lacks the keys a checkpoint has"
    files, optimizer, rng = header["files"], header["optimizer"], header["rng"]
    if not isinstance(header["run_id"], str) or not isinstance(files, dict):
        return "run_id or files has the wrong type"
    if not {"trainable", "optimizer", "method"} <= set(files) or not set(files) <= set(FILE_ROLES):
        return f"its file list {sorted(files)[:5]} is not {list(FILE_ROLES)}"
    bad = [v for v in files.values() if not (isinstance(v, str) and _FILE_NAME.fullmatch(v))]
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
