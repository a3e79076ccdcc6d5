"""The one save/load path for trainable weights: checkpoints, run folders and the analysis use it.

Writes are atomic (a reader sees the old file or the new one); loads check every name and shape, so
a 1-element tensor can never broadcast into a 52-value parameter.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save_file as st_save_file
from torch import nn

from randmask import MaskingError, atomic_target, open_limited, read_limited

HEADER_SLACK = 16 << 20  # bytes beyond the tensors' data: the safetensors header (names, shapes, offsets)
HASH_CHUNK = 1 << 20  # bytes read at a time when hashing a written file
_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how safetensors (Rust's io::Error) reports a failed write


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t``, or the whole of a sharded (DTensor) parameter: a collective, every rank must call it."""
    return t.full_tensor() if hasattr(t, "full_tensor") and hasattr(t, "device_mesh") else t


def like_param(param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` (a whole tensor) laid out as ``param``: this rank's shard of it when ``param`` is a DTensor. Every
    rank holds the whole ``value`` (read from one file, or gathered), so each takes its shard locally: no scatter
    (gloo's failed on the uneven shards of a values vector whose length the ranks do not divide). A ``value`` that is
    a DTensor already (this rank's part of a per-rank checkpoint, ``checkpoint_shards.as_dtensors``) stays as it is."""
    if hasattr(value, "device_mesh"):
        return value
    if hasattr(param, "device_mesh") and hasattr(param, "placements"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements,
                                 src_data_rank=None)
    return value.to(param.device, param.dtype)


class TrainableMismatchError(ValueError):
    """Saved tensors do not fit the model they are loaded into (names or shapes differ)."""


def trainable_tensors(model: nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
    """Detached CPU copies of the trainable parameters, by name (whole: sharded ones are gathered, on every rank).

    ``keep=False``, for a rank of a sharded run that does not write them: each is still gathered (a collective every
    rank must join, in the same order) and dropped at once, so that rank never holds a whole copy of them all."""
    out = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            whole = full_tensor(p.detach())
            if keep:
                out[n] = whole.cpu().clone().contiguous()
    return out


def load_trainable(model: nn.Module, tensors: dict[str, torch.Tensor], source: str = "saved tensors") -> None:
    """Copy ``tensors`` into the same-named parameters of ``model``, checking names and shapes first.

    Nothing is copied unless everything fits. Dtypes are converted (a bf16 run's fp32 master
    copy loads into an fp32 model). ``source`` names the file in errors.
    """
    params = dict(model.named_parameters())
    missing = sorted(set(tensors) - set(params))
    if missing:
        raise TrainableMismatchError(
            f"{source}: {len(missing)} tensor(s) have no parameter in this model (first: {missing[0]!r}); "
            "prepare the model with the same method, targets and options before loading")
    for name, t in tensors.items():
        if tuple(t.shape) != tuple(params[name].shape):
            raise TrainableMismatchError(
                f"{source}: shape mismatch for {name!r}: saved {tuple(t.shape)}, model "
                f"{tuple(params[name].shape)}; was it prepared with other options?")
    # Every trainable parameter must be in the file: one left out would silently keep its initial value
    # (a resumed run would lose that part of its training).
    absent = sorted(n for n, p in params.items() if p.requires_grad and n not in tensors)
    if absent:
        raise TrainableMismatchError(
            f"{source}: lacks {len(absent)} of the model's trainable parameters (first: {absent[0]!r}); the file is "
            "damaged or was saved from a model prepared with other options")
    with torch.no_grad():
        for name, t in tensors.items():
            params[name].copy_(like_param(params[name], t))


def _save_file(tensors: dict[str, torch.Tensor], tmp: Path, path: Path) -> None:
    """``safetensors.torch.save_file``, with a failed write (a full disk, a file-size limit) an ``OSError`` naming
    ``path`` as Python's own writes raise it (safetensors reports it as a SafetensorError), so ``disk_problem``
    still tells the user what to do."""
    try:
        st_save_file(tensors, tmp)
    except SafetensorError as e:
        code = _OS_ERROR.search(str(e))
        if code is None:
            raise
        raise OSError(int(code[1]), os.strerror(int(code[1])), str(path)) from e


def _sha256_of(path: Path, max_bytes: int) -> str:
    """The SHA-256 (hex) of the regular file at ``path`` (read bounded, a chunk at a time, never whole in memory); a
    ValueError when it is not one of at most ``max_bytes``."""
    digest, seen = hashlib.sha256(), 0
    with open_limited(path, max_bytes, "tensor file", error=ValueError) as (f, _):
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
            seen += len(chunk)
            if seen > max_bytes:
                raise ValueError(f"{path} grew past the {max_bytes:,}-byte limit while being read (tensor file)")
    return digest.hexdigest()


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    """Atomically write ``tensors`` as one safetensors file (``randmask.atomic_target``); returns its SHA-256 (hex).
    Streamed: safetensors 0.8 writes each tensor straight from its memory (``save`` built the whole file as bytes
    first, and a copy of them: two copies of the file at once), and the digest is read back from the disk."""
    cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_target(Path(path)) as tmp:
        _save_file(cpu, tmp, Path(path))
        digest = _sha256_of(tmp, max_bytes=1 << 62)  # the file just written: no limit to check
    return digest


def recorded_sha256(path: Path, max_bytes: int, recorded: str | None) -> str | None:
    """``recorded`` when the tensor file at ``path`` (read bounded) still has that SHA-256, else None: the best
    epoch's copy that the checkpoint being replaced names is named again rather than rewritten. Only a file that
    checkpoint records: a killed attempt may have left one under the same name, written before its state.json, from
    a run whose resumed re-run need not be bit for bit the same (another machine or commit)."""
    if recorded is None or not Path(path).is_file():
        return None
    return recorded if _sha256_of(Path(path), max_bytes) == recorded else None


def tensor_file_limit(model: nn.Module, copies: int = 1) -> int:
    """The most bytes a safetensors file of ``copies`` tensors per trainable parameter of ``model`` can need
    (8 bytes per entry: fp64 at most), plus its header."""
    return 8 * copies * sum(p.numel() for p in model.parameters() if p.requires_grad) + HEADER_SLACK


def read_tensors(path: Path, max_bytes: int, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Read a safetensors file through the bounded reader (a regular file of at most ``max_bytes``, checked before
    reading; with ``sha256``, those exact bytes); a damaged, oversized or non-regular one is a ValueError."""
    blob = read_limited(path, max_bytes, "tensor file", error=ValueError)
    if sha256 is not None and hashlib.sha256(blob).hexdigest() != sha256:
        raise ValueError(f"{path} does not match the checksum recorded when it was written (truncated or damaged)")
    try:
        return st_load(blob)
    except (SafetensorError, MaskingError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e})") from e
