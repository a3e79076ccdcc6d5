"""Resumable checkpoints: safetensors + JSON only, never pickles, written atomically.

A checkpoint folder holds ``state.json`` (epoch, step, RNG state, history, optimizer
hyper-parameters) and the safetensors files it names: the trainable tensors, the optimizer state
tensors flattened to ``state.<param index>.<key>``, the best epoch's trainable tensors, and
method state (AdaLoRA's importance scores). Tensor files carry the step in their name and
``state.json`` is replaced last, so a kill at any moment leaves the previous checkpoint whole.
"""

from __future__ import annotations

import base64
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from randmask import atomic_write_bytes

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
    train_seconds: float = 0.0  # across resumes


def trainable_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached CPU copies of the trainable parameters, by name."""
    return {n: p.detach().cpu().clone().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy tensors into the same-named parameters (randmask layers sync their weights on forward)."""
    params = dict(model.named_parameters())
    missing = sorted(set(tensors) - set(params))
    if missing:
        raise ValueError(f"checkpoint tensor {missing[0]!r} has no parameter in this model; "
                         "was it prepared with another method or options?")
    with torch.no_grad():
        for name, t in tensors.items():
            params[name].copy_(t.to(params[name].device, params[name].dtype))


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


def _adalora_tuner(model: nn.Module) -> Any:
    tuner = getattr(model, "base_model", None)
    return tuner if hasattr(tuner, "rankallocator") else None


def method_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Training state a method keeps outside its parameters (AdaLoRA: importance scores, ranks)."""
    tuner = _adalora_tuner(model)
    if tuner is None:
        return {}, {}
    alloc = tuner.rankallocator
    tensors = {f"{kind}.{n}": t.detach().cpu().contiguous()
               for kind in ("ipt", "exp_avg_ipt", "exp_avg_unc") for n, t in getattr(alloc, kind).items()}
    config = tuner.peft_config[tuner.trainable_adapter_name]
    pattern = {k: [bool(b) for b in v] for k, v in (config.rank_pattern or {}).items()}
    return tensors, {"rank_pattern": pattern or None}


def restore_method_state(model: nn.Module, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Inverse of ``method_state``."""
    tuner = _adalora_tuner(model)
    if tuner is None:
        return
    alloc = tuner.rankallocator
    device = next(model.parameters()).device
    for kind in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
        setattr(alloc, kind, {n.split(".", 1)[1]: t.to(device) for n, t in tensors.items()
                              if n.split(".", 1)[0] == kind})
    tuner.peft_config[tuner.trainable_adapter_name].rank_pattern = meta.get("rank_pattern")


def save_checkpoint(folder: Path, state: TrainState, model: nn.Module, optimizer: torch.optim.Optimizer,
                    best: dict[str, torch.Tensor] | None, run_id: str) -> None:
    """Write a checkpoint of the run at ``state`` (rank 0 only)."""
    folder.mkdir(parents=True, exist_ok=True)
    opt_tensors, opt_meta = _flatten_optimizer(optimizer)
    m_tensors, m_meta = method_state(model)
    tag = f"{state.global_step:08d}"
    files = {"trainable": f"trainable-{tag}.safetensors", "optimizer": f"optimizer-{tag}.safetensors",
             "method": f"method-{tag}.safetensors"}
    atomic_write_bytes(folder / files["trainable"], st_save(trainable_tensors(model)))
    atomic_write_bytes(folder / files["optimizer"], st_save(opt_tensors))
    atomic_write_bytes(folder / files["method"], st_save(m_tensors))
    if best is not None:
        files["best"] = f"best-epoch{state.best_epoch}.safetensors"
        if not (folder / files["best"]).is_file():
            atomic_write_bytes(folder / files["best"], st_save(best))
    header = {"run_id": run_id, "files": files, "state": asdict(state), "optimizer": opt_meta,
              "method": m_meta, "rng": _rng_state()}
    atomic_write_bytes(folder / STATE, (json.dumps(header) + "\n").encode())
    for old in folder.glob("*.safetensors"):  # files of older checkpoints
        if old.name not in files.values():
            old.unlink(missing_ok=True)


def load_checkpoint(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, run_id: str
                    ) -> tuple[TrainState, dict[str, torch.Tensor] | None] | None:
    """Restore model, optimizer, method and RNG state; (state, best tensors), or None if absent."""
    path = folder / STATE
    if not path.is_file():
        return None
    header = json.loads(path.read_text())
    if header.get("run_id") != run_id:
        raise ValueError(f"{path} belongs to run {header.get('run_id')!r}, not {run_id!r}; delete the folder")
    read = lambda key: st_load((folder / header["files"][key]).read_bytes())
    load_trainable(model, read("trainable"))
    optimizer.load_state_dict(_unflatten_optimizer(read("optimizer"), header["optimizer"]))
    restore_method_state(model, read("method"), header["method"])
    _set_rng_state(header["rng"])
    best = read("best") if "best" in header["files"] else None
    return TrainState(**header["state"]), best
