"""The adapter folder's format: its two file names, the header (``adapter_config.json``) and reading both files
back, verified (size bounds, checksums, the tensors the header names), before anything touches a model."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load

from randmask.config import MaskingError
from randmask.files import read_json_limited, read_limited
from randmask.integrity import CONFIG_CHECKSUM_KEY, check_header, config_checksum
from randmask.version import __version__

WEIGHTS_NAME = "adapter.safetensors"
CONFIG_NAME = "adapter_config.json"
FORMAT = "randmask-adapter"
FORMAT_VERSION = 2  # 2: config checksum and per-matrix base fingerprints
MAX_CONFIG_BYTES = 64 << 20  # ~500 bytes per matrix: far above any real model's config

_FIX = "Re-save the adapter with randmask.save_adapter."
_NOT_FOUND = f"an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME} as written by randmask.save_adapter"


def _read_header(cfg_path: Path) -> dict:
    header = read_json_limited(cfg_path, MAX_CONFIG_BYTES, "randmask adapter config",
                               fix=f"{_NOT_FOUND}. {_FIX}")
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise MaskingError(f"{cfg_path} is not a randmask adapter config (format != {FORMAT!r}).")
    version = header.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise MaskingError(f"{cfg_path}: format_version {version!r} is not an int; the config is corrupt. "
                           "Re-save the adapter.")
    if version > FORMAT_VERSION:
        raise MaskingError(f"{cfg_path} has format_version {version}; this randmask ({__version__}) reads up "
                           f"to {FORMAT_VERSION}. Upgrade randmask.")
    if version < FORMAT_VERSION:
        raise MaskingError(f"{cfg_path} has format_version {version}, which has no integrity checksum or base "
                           "fingerprint. Load it with the randmask that wrote it and save it again with "
                           f"randmask >= {__version__}.")
    check_header(header, str(cfg_path))
    if config_checksum(header) != header[CONFIG_CHECKSUM_KEY]:
        raise MaskingError(f"{cfg_path} does not match its own {CONFIG_CHECKSUM_KEY}: the config was edited or "
                           "damaged (e.g. a matrix removed). Re-save the adapter.")
    return header


def weights_size_limit(header: dict) -> int:
    """The most bytes the weights file of ``header`` can hold: values (up to 8 bytes each), stored indices,
    and the safetensors header (names and offsets, well under 1 KB per tensor)."""
    entries = sum(info["nnz"] * (16 if info["explicit_indices"] else 8) for info in header["matrices"].values())
    return entries + 1024 * (2 * len(header["matrices"]) + 1) + 8


def read_adapter_files(path: str | os.PathLike, max_entries: int | None = None
                       ) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read and verify an adapter folder: (header dict, tensors). Clear errors when damaged.

    ``max_entries`` bounds the trained entries the config may claim (``load_adapter``: the base model's
    parameter count), so that nothing sized by the file is read or allocated past it.
    """
    folder = Path(path)
    cfg_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    header = _read_header(cfg_path)
    if max_entries is not None and header["trainable"] > max_entries:
        raise MaskingError(f"{cfg_path} claims {header['trainable']:,} trained entries, more than the "
                           f"{max_entries:,} this base model has; it was saved from another model or edited. {_FIX}")
    blob = read_limited(weights_path, weights_size_limit(header), "randmask adapter weights",
                        fix=f"the file does not match {CONFIG_NAME}. {_FIX}")
    if hashlib.sha256(blob).hexdigest() != header["weights_sha256"]:
        raise MaskingError(f"{weights_path} does not match the checksum in {CONFIG_NAME}: the file is "
                           "truncated, corrupt, or from another save. Re-save the adapter.")
    try:
        tensors = st_load(blob)
    except (SafetensorError, ValueError) as e:
        raise MaskingError(f"{weights_path} is not a readable safetensors file ({e}).") from None
    expected = {f"{n}.values" for n in header["matrices"]}
    expected |= {f"{n}.indices" for n, info in header["matrices"].items() if info["explicit_indices"]}
    if set(tensors) != expected:
        raise MaskingError(f"{weights_path} holds tensors {sorted(set(tensors) ^ expected)[:4]} that do not match "
                           f"the matrices in {CONFIG_NAME}; the files are from different saves. Re-save the adapter.")
    return header, tensors


__all__ = ["CONFIG_NAME", "FORMAT", "FORMAT_VERSION", "MAX_CONFIG_BYTES", "WEIGHTS_NAME", "read_adapter_files",
           "weights_size_limit"]
