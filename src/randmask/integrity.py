"""Adapter-file integrity: header schema, content checksum, base fingerprints, index checks.

Everything here runs before ``load_adapter`` allocates anything sized by the file, so a
hostile or damaged ``adapter_config.json`` is refused with a ``MaskingError`` instead of a
raw exception or an out-of-memory kill.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any, NoReturn

import torch

from randmask.config import MaskingError
from randmask.masks import tensor_sha256

CONFIG_CHECKSUM_KEY = "config_sha256"
# Dtypes a fingerprint is recorded in: the weight's own, plus every narrower one it can be
# cast to, so that an adapter trained on an fp32 base verifies on the same base cast to bf16/fp16.
_FLOAT_DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16,
                 "float16": torch.float16}
_NARROWER = {"float64": ("float32", "bfloat16", "float16"), "float32": ("bfloat16", "float16")}
_FINGERPRINT_CHARS = 16  # 64 bits per dtype: a collision by chance is out of reach

_TOP_LEVEL = {"format": str, "format_version": int, "library_version": str, "masking_config": dict,
              "total_params": int, "trainable": int, "base_model": dict, "matrices": dict,
              "weights_sha256": str, CONFIG_CHECKSUM_KEY: str}
_MATRIX = {"stored_shape": list, "transposed": bool, "blocks": list, "nnz": int, "indices_checksum": str,
           "explicit_indices": bool, "base_fingerprint": dict}


def config_checksum(header: dict[str, Any]) -> str:
    """SHA-256 of the header's canonical JSON, without the checksum field itself."""
    body = {k: v for k, v in header.items() if k != CONFIG_CHECKSUM_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_type(where: str, key: str, value: Any, kind: type) -> None:
    ok = _is_int(value) if kind is int else isinstance(value, kind)
    if not ok:
        raise MaskingError(f"{where}: {key!r} is {type(value).__name__} {str(value)[:40]!r}; expected "
                           f"{kind.__name__}. The adapter config is corrupt or hand-edited: re-save the adapter.")


def check_header(header: dict[str, Any], where: str) -> None:
    """Types and ranges of every header field a loader reads; ``MaskingError`` on the first bad one."""
    for key, kind in _TOP_LEVEL.items():
        if key not in header:
            raise MaskingError(f"{where} lacks {key!r}; the adapter config is truncated or hand-edited. "
                               "Re-save the adapter with randmask.save_adapter.")
        _check_type(where, key, header[key], kind)
    if header["total_params"] <= 0 or header["trainable"] <= 0:
        raise MaskingError(f"{where}: total_params and trainable must be positive; re-save the adapter.")
    if not header["matrices"]:
        raise MaskingError(f"{where} lists no matrices (an empty adapter); re-save the adapter.")
    for name, info in header["matrices"].items():
        _check_matrix(f"{where} matrix {name!r}", info)
    total = sum(info["nnz"] for info in header["matrices"].values())
    if total != header["trainable"]:
        raise MaskingError(f"{where}: the matrices hold {total} entries but 'trainable' says "
                           f"{header['trainable']}; the config was edited. Re-save the adapter.")


def _check_matrix(where: str, info: Any) -> None:
    if not isinstance(info, dict):
        raise MaskingError(f"{where} is not an object; the adapter config is corrupt. Re-save the adapter.")
    for key, kind in _MATRIX.items():
        if key not in info:
            raise MaskingError(f"{where} lacks {key!r}; the adapter config is corrupt. Re-save the adapter.")
        _check_type(where, key, info[key], kind)
    shape = info["stored_shape"]
    if len(shape) != 2 or not all(_is_int(d) and d > 0 for d in shape):
        raise MaskingError(f"{where}: stored_shape {shape!r} is not two positive ints; re-save the adapter.")
    for block in info["blocks"]:
        if not (isinstance(block, list) and len(block) == 4 and isinstance(block[0], str)
                and all(_is_int(x) for x in block[1:])):
            raise MaskingError(f"{where}: block {str(block)[:60]!r} is not [name, start, stop, nnz]; "
                               "re-save the adapter.")
    for dtype, digest in info["base_fingerprint"].items():
        if dtype not in _FLOAT_DTYPES or not isinstance(digest, str):
            raise MaskingError(f"{where}: base_fingerprint entry {dtype!r} is not a float dtype -> hash; "
                               "re-save the adapter.")


def check_blocks(name: str, info: dict[str, Any], out_f: int, in_f: int) -> None:
    """Blocks are ordered, disjoint row ranges of the (out, in) matrix whose nnz fit and sum up.

    Called with the model's real shape, so that every later allocation sized by ``nnz`` is
    bounded by a matrix this model actually has.
    """
    prev_stop = 0
    for block_name, start, stop, nnz in info["blocks"]:
        if not (prev_stop <= start < stop <= out_f):
            raise MaskingError(f"{name}: block {block_name!r} rows [{start}, {stop}) are not an ordered, "
                               f"disjoint range within the {out_f} output rows; the adapter config was "
                               "edited or is from another base model. Re-save the adapter.")
        if not 0 <= nnz <= (stop - start) * in_f:  # 0: a structured block allotted no column
            raise MaskingError(f"{name}: block {block_name!r} claims {nnz} entries in a "
                               f"{stop - start}x{in_f} block; re-save the adapter.")
        prev_stop = stop
    if not info["blocks"]:
        raise MaskingError(f"{name}: no blocks; the adapter config is corrupt. Re-save the adapter.")
    if sum(b[3] for b in info["blocks"]) != info["nnz"]:
        raise MaskingError(f"{name}: the blocks' entry counts do not sum to nnz={info['nnz']}; "
                           "re-save the adapter.")


def check_draw_size(name: str, info: dict[str, Any], densities: list[float], kind: str) -> None:
    """Before a built-in mask is regenerated from a file's config without a model to check its shape against
    (SHiRA export from a folder), bound the sampler's work by the saved entry count: each block's expected
    entry count (p x rows x in) must be near its saved nnz, so an edited shape or budget cannot make it
    allocate gigabytes. Bernoulli draws stay within a few standard deviations; the other kinds are exact."""
    in_f = info["stored_shape"][1]
    for (block_name, start, stop, nnz), p in zip(info["blocks"], densities):
        expected = p * (stop - start) * in_f
        if expected > 2 * nnz + 6 * math.sqrt(nnz) + 64:
            raise MaskingError(f"{name}: block {block_name!r} would draw about {expected:,.0f} {kind} entries but "
                               f"the adapter saved {nnz:,}; its shape or budget was edited. Re-save the adapter.")


def check_explicit_indices(name: str, indices: torch.Tensor, info: dict[str, Any], logical: tuple[int, int],
                           transposed: bool) -> torch.Tensor:
    """Stored custom indices: int64, 1-D, nnz long, strictly increasing, in range, inside the blocks."""
    if indices.dtype != torch.int64 or indices.ndim != 1 or indices.numel() != info["nnz"]:
        raise MaskingError(f"{name}: stored indices must be {info['nnz']} int64 entries; got {indices.dtype} "
                           f"of shape {tuple(indices.shape)}. Re-save the adapter.")
    out_f, in_f = logical
    if indices.numel() and (indices[0] < 0 or indices[-1] >= out_f * in_f or (indices.diff() <= 0).any()):
        raise MaskingError(f"{name}: stored indices are not sorted, unique and within 0..{out_f * in_f - 1}; "
                           "the adapter file was edited. Re-save the adapter.")
    rows = indices % out_f if transposed else torch.div(indices, in_f, rounding_mode="floor")
    for block_name, start, stop, nnz in info["blocks"]:
        if int(((rows >= start) & (rows < stop)).sum()) != nnz:
            raise MaskingError(f"{name}: stored indices do not match block {block_name!r}; re-save the adapter.")
    return indices


def base_fingerprint(entries: torch.Tensor) -> dict[str, str]:
    """Short hashes of W0 at the kept entries, in the weight's dtype and each narrower float dtype."""
    dtype = str(entries.dtype).removeprefix("torch.")
    names = (dtype, *_NARROWER.get(dtype, ()))
    return {n: tensor_sha256(entries.to(_FLOAT_DTYPES[n]))[:_FINGERPRINT_CHARS] for n in names}


def check_base(name: str, entries: torch.Tensor, saved: dict[str, str], scheme: str | None = None,
               opt_out: str = "verify_base=False") -> None:
    """Refuse a base whose W0 at the kept entries differs from the one the adapter was trained on. ``opt_out``: how
    the caller's loader skips this check (named in the error); ``scheme``: the base's quantization scheme, if any,
    named with why an exact fingerprint cannot match across precisions."""
    dtype = str(entries.dtype).removeprefix("torch.")
    if dtype in saved:
        compare_in = dtype
    else:  # this base is wider than the saved one (e.g. fp32 here, bf16 at save): compare in the saved dtype
        wider = [n for n in saved if n in _FLOAT_DTYPES and
                 _FLOAT_DTYPES[n].itemsize < entries.dtype.itemsize] if entries.is_floating_point() else []
        if not wider:
            _refuse_base(f"{name}: the adapter's base fingerprint was recorded in {sorted(saved)}, which cannot be "
                         f"compared with this {dtype} base. Load it onto the base in {sorted(saved)[0]} or float32, "
                         f"or pass {opt_out}.", scheme, opt_out)
        compare_in = max(wider, key=lambda n: _FLOAT_DTYPES[n].itemsize)
    digest = tensor_sha256(entries.to(_FLOAT_DTYPES[compare_in]))[:_FINGERPRINT_CHARS]
    if digest != saved[compare_in]:
        _refuse_base(f"{name}: this model's weights at the adapter's entries differ from the base it was trained on "
                     "(another checkpoint of the same architecture, or a model that already has this adapter merged "
                     "in). Load it onto the original, unmerged base model.", scheme, opt_out)


def _refuse_base(message: str, scheme: str | None, opt_out: str) -> NoReturn:
    # An exact hash: an adapter trained on the float base never verifies on its quantized copy, nor the reverse.
    if scheme is not None:
        message += (f" This base is quantized ({scheme}): an adapter trained on another precision of the same "
                    f"checkpoint (e.g. its bf16/fp32 weights) cannot match the exact fingerprint; if this is that "
                    f"checkpoint, pass {opt_out}: it skips this check alone.")
    elif opt_out not in message:
        message += (f" An adapter trained on a quantized copy of this checkpoint (4-bit, int8) cannot match the exact "
                    f"fingerprint either; if that is what this is, pass {opt_out}: it skips this check alone.")
    raise MaskingError(message)


__all__ = ["CONFIG_CHECKSUM_KEY", "base_fingerprint", "check_base", "check_blocks", "check_draw_size",
           "check_explicit_indices", "check_header", "config_checksum"]
