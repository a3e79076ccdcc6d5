"""Per-rank checkpoint parts of a sharded (FSDP2) run: each rank writes its own shards, nothing is gathered.

Each rank ``r`` of ``w`` writes ``trainable-<step>-rank<r>-of-<w>.safetensors``, ``optimizer-<step>-rank<r>-of-<w>``
and ``best-epoch<e>-rank<r>-of-<w>``: its local shards (``DTensor.to_local()``) of the trainable parameters, of
AdamW's moments and of the best epoch's copy; plain tensors (AdamW's step counter) are whole in every part. The only
collective is one ``all_gather_object`` of each rank's file names, checksums, sizes and shard lengths, after its
files are whole; the writing rank then records them in ``state.json`` (``sha256`` holds every part's digest)::

    "shards": {"world": 2, "files": {"trainable": [rank 0's, rank 1's], "optimizer": [...], "best": [...]},
               "sizes": {file: bytes},
               "layout": {"trainable": {name: {"shape": [3, 4], "dim": 0, "offsets": [0, 2], "lengths": [2, 1]}},
                          "optimizer": {"state.0.exp_avg": {...}, "state.0.step": {"shape": [], "dim": null}}}}

The lengths are the local tensors' own (FSDP2 splits dim 0 as ``torch.chunk`` does: uneven, possibly empty). At the
checkpoint's world size each rank reads only its own parts; at another (or in one process) every rank reads every
part, checks it, and joins each tensor along its shard dim: whole tensors, which ``like_param`` shards for this run.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from itertools import accumulate
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from randmask_lab.errors import RunError
from randmask_lab.experiment.training.checkpoint_header import FILE_NAME
from randmask_lab.fs import make_folder
from randmask_lab.methods.trainable import like_param, read_tensors, recorded_sha256, trainable_tensors, write_tensors

SHARDED_ROLES = frozenset({"trainable", "optimizer", "best"})
MAX_WORLD = 1 << 16  # the rank count a header may claim: it sizes the lists this code builds from it
_MOMENT = re.compile(r"state\.(\d+)\.[A-Za-z0-9_]+")


def _is_dtensor(t: torch.Tensor) -> bool:
    return hasattr(t, "device_mesh") and hasattr(t, "placements")


def _supported(t: torch.Tensor) -> bool:
    """A DTensor split on one dim over a 1-D mesh of every rank, in rank order (FSDP2's ``Shard(0)``). Any other
    layout (HSDP's 2-D mesh, a strided shard) keeps the whole-file format, which gathers it."""
    from torch.distributed.tensor import Shard

    mesh = t.device_mesh
    return (mesh.ndim == 1 and mesh.size() == dist.get_world_size() and mesh.get_local_rank() == dist.get_rank()
            and len(t.placements) == 1 and type(t.placements[0]) is Shard)


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model``'s trainable parameters are DTensors this format saves as per-rank parts."""
    sharded = [p for p in model.parameters() if p.requires_grad and _is_dtensor(p)]
    return bool(sharded) and dist.is_initialized() and all(_supported(p) for p in sharded)


def part_name(role: str, tag: str, rank: int, world: int) -> str:
    """The file of ``rank``'s part of ``role`` (``tag``: the step, or ``epoch<e>`` for the best copy)."""
    return f"{role}-{tag}-rank{rank}-of-{world}.safetensors"


def trainable_copy(model: nn.Module, whole: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The trainable tensors as a run keeps a copy of them (the best epoch's): this rank's shards, on the CPU, of a
    sharded model (never a whole one), whole tensors otherwise. Of the model's own parameters, or of ``whole``:
    whole tensors read back from a file (returned as they are for a model that is not sharded)."""
    if not is_sharded(model):
        return trainable_tensors(model) if whole is None else whole
    params = dict(model.named_parameters())
    if whole is None:
        whole = {n: p.detach() for n, p in params.items() if p.requires_grad}  # DTensors: like_param keeps them
    return {n: like_param(params[n], t).to_local().cpu().clone() if n in params else t for n, t in whole.items()}


def as_dtensors(tensors: dict[str, torch.Tensor], params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This rank's shards as DTensors laid out as the same-named ``params`` (a name without one stays as it is)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, t in tensors.items():
        p = params.get(name)
        if p is not None and _is_dtensor(p):
            if tuple(t.shape) != tuple(p.to_local().shape):
                raise ValueError(f"rank {dist.get_rank()}'s part of {name} has shape {tuple(t.shape)}, its shard "
                                 f"{tuple(p.to_local().shape)}")
            t = DTensor.from_local(t.to(p.device, p.dtype), p.device_mesh, p.placements, run_check=False,
                                   shape=p.shape, stride=p.stride())
        out[name] = t
    return out


def _layout(tensors: dict[str, torch.Tensor]) -> dict[str, list[Any]]:
    """Each tensor's [global shape, shard dim (None: whole on every rank), this rank's length along it]: the local
    tensor's own length, as torch split it, not a split computed here."""
    out = {}
    for name, t in tensors.items():
        dim = t.placements[0].dim if _is_dtensor(t) else None
        out[name] = [list(t.shape), dim, None if dim is None else t.to_local().shape[dim]]
    return out


def _write_mine(folder: Path, tags: dict[str, str], tensors: dict[str, dict[str, torch.Tensor]],
                best: dict[str, torch.Tensor] | None, limit: int, recorded: dict[str, str]) -> dict[str, Any]:
    rank, world = dist.get_rank(), dist.get_world_size()
    make_folder(folder)
    mine: dict[str, Any] = {"files": {}, "sha256": {}, "layout": {role: _layout(t) for role, t in tensors.items()}}
    for role, named in tensors.items():
        name = mine["files"][role] = part_name(role, tags[role], rank, world)
        mine["sha256"][name] = write_tensors(folder / name, {k: v.to_local() if _is_dtensor(v) else v
                                                             for k, v in named.items()})
    if best is not None:  # the part the checkpoint being replaced names, unchanged since: reused
        name = mine["files"]["best"] = part_name("best", tags["best"], rank, world)
        mine["sha256"][name] = recorded_sha256(folder / name, limit, recorded.get(name)) or write_tensors(
            folder / name, best)
    mine["sizes"] = {n: (folder / n).stat().st_size for n in mine["sha256"]}
    return mine


def write_parts(folder: Path, tags: dict[str, str], tensors: dict[str, dict[str, torch.Tensor]],
                best: dict[str, torch.Tensor] | None, limit: int, recorded: dict[str, str]
                ) -> tuple[dict[str, Any], dict[str, str]]:
    """Every rank: write this rank's parts of ``tensors`` (by role; a DTensor gives its local shard) and of ``best``
    (already this rank's shards; reused where the checkpoint being replaced, whose digests are ``recorded``, names
    it unchanged); returns ``state.json``'s ``shards`` and every part's SHA-256, on every rank."""
    try:
        mine = _write_mine(folder, tags, tensors, best, limit, recorded)
    except (OSError, RunError, ValueError) as e:  # the other ranks wait at the gather: all stop, on this error
        mine = {"error": f"rank {dist.get_rank()} could not write its checkpoint part ({' '.join(str(e).split())})"}
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)  # after every rank's files are whole: state.json may name them
    errors = [p["error"] for p in everyone if "error" in p]
    if errors:
        raise RunError(f"{errors[0][:300]}; free space or fix the folder, then run the same command again (it "
                       "resumes from the last whole checkpoint)")
    layout = {role: {name: _entry([p["layout"][role][name] for p in everyone]) for name in per_name}
              for role, per_name in everyone[0]["layout"].items()}
    shards = {"world": len(everyone), "files": {role: [p["files"][role] for p in everyone] for role in mine["files"]},
              "sizes": {k: v for p in everyone for k, v in p["sizes"].items()}, "layout": layout}
    problem = layout_problem(layout, len(everyone))
    if problem:  # torch split a tensor otherwise than this format records: never write a header that misreads it
        raise RuntimeError(f"per-rank checkpoint parts: {problem}")
    return shards, {k: v for p in everyone for k, v in p["sha256"].items()}


def _entry(per_rank: list[list[Any]]) -> dict[str, Any]:
    shape, dim, _ = per_rank[0]
    if dim is None:
        return {"shape": shape, "dim": None}
    lengths = [length for _, _, length in per_rank]
    return {"shape": shape, "dim": dim, "offsets": [0, *accumulate(lengths)][:-1], "lengths": lengths}


def _counts(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v)


def _entry_problem(name: str, e: Any, world: int) -> str | None:
    if not (isinstance(e, dict) and _counts(e.get("shape")) and len(e["shape"]) <= 8):
        return f"its shard layout of {name[:60]!r} is not {{shape, dim, offsets, lengths}}"
    shape, dim, offsets, lengths = e["shape"], e.get("dim"), e.get("offsets"), e.get("lengths")
    if dim is None:
        return None
    if not (isinstance(dim, int) and not isinstance(dim, bool) and 0 <= dim < len(shape) and _counts(offsets)
            and _counts(lengths) and len(offsets) == len(lengths) == world
            and offsets == [0, *accumulate(lengths)][:-1] and sum(lengths) == shape[dim]):
        return (f"its shard layout of {name[:60]!r} (dim {str(dim)[:10]}, offsets {str(offsets)[:60]}, lengths "
                f"{str(lengths)[:60]}) does not tile its shape {shape} over {world} ranks")
    return None


def layout_problem(layout: Any, world: int) -> str | None:
    """What makes ``layout`` not a tiling of every tensor's shape over ``world`` ranks, or None."""
    if not (isinstance(layout, dict) and set(layout) == {"trainable", "optimizer"}
            and all(isinstance(v, dict) for v in layout.values())):
        return "its shard layout is not {trainable: {...}, optimizer: {...}}"
    return next((p for entries in layout.values() for n, e in entries.items() if (p := _entry_problem(n, e, world))),
                None)


def shards_problem(header: dict[str, Any]) -> str | None:
    """What makes a header's ``shards`` (its state already checked) not the parts this code wrote at its step."""
    shards, state, sha256 = header["shards"], header["state"], header.get("sha256", {})
    if not (isinstance(shards, dict) and isinstance(shards.get("files"), dict) and isinstance(shards.get("sizes"),
                                                                                              dict)):
        return "its shards are not {world, files, sizes, layout}"
    world, files = shards.get("world"), shards["files"]
    if not (isinstance(world, int) and not isinstance(world, bool) and 1 <= world <= MAX_WORLD):
        return f"shards.world = {str(world)[:20]!r} is not a rank count"
    if not ({"trainable", "optimizer"} <= set(files) <= SHARDED_ROLES and (
            "best" not in files or state.get("best_epoch") is not None)):
        return f"its per-rank file list {sorted(files)[:4]} is not {sorted(SHARDED_ROLES)}"
    for role, names in files.items():
        if not (isinstance(names, list) and len(names) == world):
            return f"its {role} parts are not a list of {world} file names, one per rank"
        bad = [v for v in names if not (isinstance(v, str) and FILE_NAME.fullmatch(v))]
        if bad:  # e.g. "/dev/zero" or "../x": a checkpoint's files lie in its own folder
            return f"it names {str(bad[0])[:60]!r}, not a .safetensors file name in the checkpoint folder"
        tag = f"epoch{state.get('best_epoch')}" if role == "best" else f"{state.get('global_step', 0):08d}"
        for r, name in enumerate(names):
            if name != part_name(role, tag, r, world):
                return (f"its rank {r} {role} part is {name!r}, not {part_name(role, tag, r, world)!r} (a part of "
                        "another step)")
        if any(not (isinstance(sha256.get(n), str) and isinstance(shards["sizes"].get(n), int)) for n in names):
            return f"its {role} parts lack their recorded SHA-256 or size"
    return layout_problem(shards.get("layout"), world)


def _role_layout(shards: dict[str, Any], role: str) -> dict[str, Any]:
    """The shard layout ``role``'s parts follow: the optimizer's, or the trainable tensors' (the best copy's too)."""
    return shards["layout"]["optimizer" if role == "optimizer" else "trainable"]


def _read_part(folder: Path, header: dict[str, Any], role: str, rank: int, limit: int) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s part of ``role``, checked: its recorded size and SHA-256, the names its layout lists, and
    each tensor's shape against that rank's shard of it."""
    shards = header["shards"]
    name, layout = shards["files"][role][rank], _role_layout(shards, role)
    path = folder / name
    if not path.exists() and not path.is_symlink():
        raise ValueError(f"rank {rank}'s {role} part {name} is missing")
    if path.is_file() and path.stat().st_size != shards["sizes"][name]:
        raise ValueError(f"{name} is {path.stat().st_size:,} bytes, not the {shards['sizes'][name]:,} recorded when "
                         "it was written (truncated or replaced)")
    tensors = read_tensors(path, limit, sha256=header["sha256"][name])
    if set(tensors) != set(layout):
        odd = sorted(set(tensors) ^ set(layout))[0]
        raise ValueError(f"{name} and the layout in state.json disagree on {odd[:60]!r} (one names it, the other not)")
    for key, t in tensors.items():
        e = layout[key]
        want = [e["lengths"][rank] if d == e["dim"] else n for d, n in enumerate(e["shape"])]
        if list(t.shape) != want:
            raise ValueError(f"{name} holds {key} of shape {list(t.shape)}, not rank {rank}'s shard {want}")
    return tensors


def _join(name: str, entry: dict[str, Any], parts: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """The whole tensor ``name`` from every rank's part: rank 0's where it is whole on every rank."""
    if entry["dim"] is None:
        return parts[0][name]
    return torch.cat([part[name] for part in parts], dim=entry["dim"])


def sharded_reader(folder: Path, header: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
                   limit: Callable[[str], int]) -> Callable[[str], dict[str, torch.Tensor]]:
    """A reader of a sharded checkpoint's tensors by role, as ``load_checkpoint`` takes a single file's. At the
    checkpoint's world size: this rank's own parts only, as DTensors (the best copy as this rank's shards, as
    ``trainable_copy`` keeps it). At another (or in one process): every rank's parts, joined into whole tensors
    (each rank then takes its shard with ``like_param``: no scatter, and gloo's failed on uneven shards)."""
    shards = header["shards"]
    own = is_sharded(model) and shards["world"] == dist.get_world_size()
    params = dict(model.named_parameters())
    order = [p for group in optimizer.param_groups for p in group["params"]]
    moments = {n: order[int(m[1])] for n, e in shards["layout"]["optimizer"].items()
               if e["dim"] is not None and (m := _MOMENT.fullmatch(n)) and int(m[1]) < len(order)}

    def read(role: str) -> dict[str, torch.Tensor]:
        if own:
            tensors = _read_part(folder, header, role, dist.get_rank(), limit(role))
            return tensors if role == "best" else as_dtensors(tensors, moments if role == "optimizer" else params)
        parts = [_read_part(folder, header, role, r, limit(role)) for r in range(shards["world"])]
        whole = {name: _join(name, entry, parts) for name, entry in _role_layout(shards, role).items()}
        return trainable_copy(model, whole) if role == "best" else whole

    return read


def agree(problem: str | None) -> str | None:
    """The lowest rank's problem, on every rank (a collective): a part that only one rank reads must stop them
    all, or the others would train on and wait for it at their next collective. Each problem names its rank's file."""
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, problem)
    return next((p for p in everyone if p), None)
