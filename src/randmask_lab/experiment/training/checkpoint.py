"""Resumable checkpoints: safetensors + JSON only, never pickles, written atomically.

A checkpoint folder holds ``state.json`` (epoch, step, RNG state, history, optimizer
hyper-parameters) and the safetensors files it names: the trainable tensors, the optimizer state
tensors flattened to ``state.<param index>.<key>``, the best epoch's trainable tensors, and
method state (``PreparedModel.method_state``: AdaLoRA's importance scores) and the fp16
loss scaler's state. Tensor files carry the step in their name and
``state.json`` is replaced last, so a kill at any moment leaves the previous checkpoint whole. ``checkpoint_header``
holds TrainState and the checks of a header read back.

A sharded (FSDP2) run writes per-rank parts instead of the trainable, optimizer and best files
(``checkpoint_shards``): every rank writes its own shards, nothing is gathered, and ``state.json`` (written after
every rank's parts are whole) names each part with its checksum, size and the shard layout. Replicated and
single-process runs write the single-file format; a sharded run's single-file checkpoint (from before the parts, or
``whole=True``) still resumes, each rank taking its shard of the whole tensors.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from randmask import MaskingError, read_json_limited
from randmask_lab.errors import RunError
from randmask_lab.experiment.training.checkpoint_header import (  # noqa: F401 -- TrainState, code_version_ok: here too
    TrainState,
    code_version_ok,
    header_problem,
)
from randmask_lab.experiment.training.checkpoint_shards import (
    SHARDED_ROLES,
    agree,
    is_sharded,
    sharded_reader,
    shards_problem,
    trainable_copy,
    write_parts,
)
from randmask_lab.fs import make_folder, write_json
from randmask_lab.methods import PreparedModel
from randmask_lab.methods.trainable import (
    full_tensor,
    like_param,
    load_trainable,
    read_tensors,
    recorded_sha256,
    tensor_file_limit,
    trainable_tensors,
    write_tensors,
)

STATE = "state.json"
MAX_STATE_BYTES = 64 << 20  # counters, per-epoch history, RNG state, optimizer scalars: a few KB in practice
# Copies per trainable entry a file of each role may hold: AdamW keeps two moments (+ a step); AdaLoRA's method
# state keeps three importance statistics per entry.
_COPIES = {"trainable": 1, "optimizer": 3, "method": 4, "best": 1}


def _flatten_optimizer(optimizer: torch.optim.Optimizer, keep: bool = True, local: bool = False
                       ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The optimizer's per-parameter tensors by ``state.<index>.<key>`` (whole: a sharded moment is gathered, a
    collective; ``keep=False`` drops each at once, as ``trainable_tensors`` does; ``local``: each as the optimizer
    holds it, a DTensor too, never gathered), and its groups and scalars."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    # Sorted: every rank of a sharded run gathers the same tensor at the same call. A loaded state's order is the
    # file's as safetensors returned it, which differs between processes (it comes from a hash map).
    for idx in sorted(sd["state"]):
        entry = sd["state"][idx]
        for key in sorted(entry):
            value = entry[key]
            if isinstance(value, torch.Tensor) and local:
                tensors[f"state.{idx}.{key}"] = value.detach()
            elif isinstance(value, torch.Tensor):
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
                    scaler: torch.amp.GradScaler | None = None, write: bool = True, whole: bool = False) -> None:
    """Write a checkpoint of the run at ``state``: by one rank of a replicated run; by every rank of a sharded
    (FSDP2) one, each writing its own parts (``best`` is then this rank's shards, as ``trainable_copy`` keeps
    them), while the rank with ``write`` writes ``state.json`` and the method state. ``whole``: a sharded run's
    single-file format instead, as before the parts: every rank gathers the sharded tensors (collectives), only
    the rank with ``write`` keeps them, the others drop each at once."""
    tag, sharded = f"{state.global_step:08d}", not whole and is_sharded(prepared.model)
    shards, recorded = None, _recorded_digests(folder) if best is not None else {}
    if sharded:
        opt_tensors, opt_meta = _flatten_optimizer(optimizer, local=True)
        trainable = {n: p.detach() for n, p in prepared.model.named_parameters() if p.requires_grad}
        shards, part_sha = write_parts(folder, {"trainable": tag, "optimizer": tag, "best": f"epoch{state.best_epoch}"},
                                       {"trainable": trainable, "optimizer": opt_tensors}, best,
                                       tensor_file_limit(prepared.model), recorded)
        trainable, opt_tensors, best = {}, {}, None  # in the parts: the header names them
    else:
        trainable = trainable_tensors(prepared.model, keep=write)
        opt_tensors, opt_meta = _flatten_optimizer(optimizer, keep=write)
    if not write:
        if sharded:
            dist.barrier()  # the writer prunes older files in the shared folder: write no next part before that
        return
    m_tensors, m_meta = prepared.method_state()
    roles = {"trainable": trainable, "optimizer": opt_tensors} if shards is None else {}
    files, sha256 = _write_files(folder, tag, {**roles, "method": m_tensors}, best, state.best_epoch,
                                 tensor_file_limit(prepared.model), recorded)
    header = {"run_id": run_id, "files": files, "sha256": sha256, "state": asdict(state), "optimizer": opt_meta,
              "method": m_meta, "rng": _rng_state(), "scaler": scaler.state_dict() if scaler is not None else None}
    if shards is not None:
        header["sha256"] = {**sha256, **part_sha}
        header["shards"] = shards
    write_json(folder / STATE, header)
    named = set(files.values()) | {n for names in (shards or {"files": {}})["files"].values() for n in names}
    for old in folder.glob("*.safetensors"):  # files of older checkpoints (every rank's parts: a shared folder)
        if old.name not in named:
            old.unlink(missing_ok=True)
    if sharded:
        dist.barrier()


def _recorded_digests(folder: Path) -> dict[str, str]:
    """The SHA-256 of each file the checkpoint about to be replaced names ({} when there is none, or it is not one
    this code can read: then nothing is reused and every file is written)."""
    try:
        header = read_json_limited(folder / STATE, MAX_STATE_BYTES, "checkpoint header")
    except (MaskingError, OSError):
        return {}
    digests = header.get("sha256") if isinstance(header, dict) else None
    return {k: v for k, v in digests.items() if isinstance(v, str)} if isinstance(digests, dict) else {}


def _write_files(folder: Path, tag: str, tensors: dict[str, dict[str, torch.Tensor]],
                 best: dict[str, torch.Tensor] | None, best_epoch: int | None, limit: int, recorded: dict[str, str]
                 ) -> tuple[dict[str, str], dict[str, str]]:
    """Write one safetensors file per role (and the best copy's, unless the checkpoint being replaced, whose digests
    are ``recorded``, names it unchanged); their names by role and their SHA-256 by name."""
    make_folder(folder)
    files = {role: f"{role}-{tag}.safetensors" for role in tensors}
    sha256 = {files[role]: write_tensors(folder / files[role], named) for role, named in tensors.items()}
    if best is not None:
        files["best"] = f"best-epoch{best_epoch}.safetensors"
        sha256[files["best"]] = recorded_sha256(folder / files["best"], limit, recorded.get(files["best"])) or \
            write_tensors(folder / files["best"], best)
    return files, sha256


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
    """Restore model, optimizer, method, scaler and RNG state; (state, best tensors), or None if absent. The best
    tensors are as ``trainable_copy`` keeps them (this rank's shards of a sharded model).

    A damaged checkpoint (truncated JSON, missing or corrupt tensor file or rank part, tensors that do not fit) is a
    RunError that names it and the fix (--restart); on every rank of a sharded run, whichever rank found it.
    """
    path = folder / STATE
    if not path.exists() and not path.is_symlink():
        return None
    try:
        header = read_json_limited(path, MAX_STATE_BYTES, "checkpoint header")
    except MaskingError as e:
        raise _damaged(path, f"not a checkpoint header: {e}") from None
    sharded = isinstance(header, dict) and "shards" in header
    problem = header_problem(header, SHARDED_ROLES if sharded else frozenset())
    if problem is None and sharded:
        problem = shards_problem(header)  # its per-rank parts: names, checksums, sizes, a layout that tiles
    if problem:
        raise _damaged(path, problem)
    if header["run_id"] != run_id:
        raise RunError(f"{path} belongs to run {header['run_id']!r}, not {run_id!r}; run with --restart to discard it")
    loaded, problem = None, None
    try:
        loaded = _restore(folder, header, prepared, optimizer, scaler)
    # A header that passed the schema can still hold values torch refuses (a wrong RNG state size, optimizer
    # groups that do not fit): any of them means the checkpoint is damaged, never a traceback. OSError: a part
    # this rank alone could not stat must still reach the other ranks' ``agree``.
    except (ValueError, KeyError, TypeError, RuntimeError, AttributeError, IndexError, OverflowError, OSError) as e:
        problem = " ".join(str(e).split())[:300]
    if sharded and dist.is_initialized() and dist.get_world_size() > 1:
        problem = agree(problem)  # each rank read its own part: one rank's problem stops every rank
    if problem:
        raise _damaged(path, problem)
    return loaded


def _restore(folder: Path, header: dict[str, Any], prepared: PreparedModel, optimizer: torch.optim.Optimizer,
             scaler: torch.amp.GradScaler | None) -> tuple[TrainState, dict[str, torch.Tensor] | None]:
    """Load a checked header's tensors and state into the run (ValueError and friends where they do not fit)."""
    model, files = prepared.model, header["files"]
    limit: Callable[[str], int] = lambda role: tensor_file_limit(model, _COPIES[role])  # noqa: E731
    whole = lambda role: read_tensors(folder / files[role], limit(role),  # noqa: E731
                                      sha256=header.get("sha256", {}).get(files[role]))
    read = sharded_reader(folder, header, model, optimizer, limit) if "shards" in header else whole
    source = "its trainable parts" if "shards" in header else str(folder / files["trainable"])
    load_trainable(model, read("trainable"), source=source)
    optimizer.load_state_dict(_unflatten_optimizer(read("optimizer"), header["optimizer"], optimizer))
    prepared.restore_method_state(whole("method"), header.get("method") or {})
    roles = header["shards"]["files"] if "shards" in header else files
    best = read("best") if "best" in roles else None
    if best is not None and "shards" not in header:
        best = trainable_copy(model, best)  # a single file's whole tensors: kept as this rank's shards
    state = TrainState(**header["state"])
    if scaler is not None and header.get("scaler"):
        scaler.load_state_dict(header["scaler"])
    _set_rng_state(header["rng"])
    return state, best
