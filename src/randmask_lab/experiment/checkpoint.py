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
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from randmask_lab.errors import RunError
from randmask_lab.methods import PreparedModel
from randmask_lab.methods.trainable import load_trainable, read_tensors, trainable_tensors, write_json, write_tensors

STATE = "state.json"


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


def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, t in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = t
    for name, value in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


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
                    scaler: torch.amp.GradScaler | None = None) -> None:
    """Write a checkpoint of the run at ``state`` (rank 0 only)."""
    folder.mkdir(parents=True, exist_ok=True)
    opt_tensors, opt_meta = _flatten_optimizer(optimizer)
    m_tensors, m_meta = prepared.method_state()
    tag = f"{state.global_step:08d}"
    files = {"trainable": f"trainable-{tag}.safetensors", "optimizer": f"optimizer-{tag}.safetensors",
             "method": f"method-{tag}.safetensors"}
    write_tensors(folder / files["trainable"], trainable_tensors(prepared.model))
    write_tensors(folder / files["optimizer"], opt_tensors)
    write_tensors(folder / files["method"], m_tensors)
    if best is not None:
        files["best"] = f"best-epoch{state.best_epoch}.safetensors"
        if not (folder / files["best"]).is_file():
            write_tensors(folder / files["best"], best)
    header = {"run_id": run_id, "files": files, "state": asdict(state), "optimizer": opt_meta,
              "method": m_meta, "rng": _rng_state(), "scaler": scaler.state_dict() if scaler is not None else None}
    write_json(folder / STATE, header)
    for old in folder.glob("*.safetensors"):  # files of older checkpoints
        if old.name not in files.values():
            old.unlink(missing_ok=True)


def _damaged(path: Path, why: str) -> RunError:
    return RunError(f"the checkpoint {path} is damaged ({why}); run the same command with --restart to discard "
                    "it and start the run over")


def load_checkpoint(folder: Path, prepared: PreparedModel, optimizer: torch.optim.Optimizer, run_id: str,
                    scaler: torch.amp.GradScaler | None = None
                    ) -> tuple[TrainState, dict[str, torch.Tensor] | None] | None:
    """Restore model, optimizer, method, scaler and RNG state; (state, best tensors), or None if absent.

    A damaged checkpoint (truncated JSON, missing or corrupt tensor file, tensors that do not fit)
    is a RunError that names it and the fix (--restart).
    """
    path = folder / STATE
    if not path.is_file():
        return None
    try:
        header = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(header, dict) or not {"run_id", "files", "state", "optimizer", "rng"} <= set(header):
            raise ValueError("it lacks the keys a checkpoint has")
    except (ValueError, UnicodeDecodeError) as e:
        raise _damaged(path, f"not a checkpoint header: {e}") from None
    if header["run_id"] != run_id:
        raise RunError(f"{path} belongs to run {header['run_id']!r}, not {run_id!r}; run with --restart to discard it")
    try:
        read = lambda key: read_tensors(folder / header["files"][key])
        load_trainable(prepared.model, read("trainable"), source=str(folder / header["files"]["trainable"]))
        optimizer.load_state_dict(_unflatten_optimizer(read("optimizer"), header["optimizer"]))
        prepared.restore_method_state(read("method"), header.get("method") or {})
        best = read("best") if "best" in header["files"] else None
        state = TrainState(**header["state"])
        if scaler is not None and header.get("scaler"):
            scaler.load_state_dict(header["scaler"])
        _set_rng_state(header["rng"])
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise _damaged(path, " ".join(str(e).split())) from None
    return state, best
