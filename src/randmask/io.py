"""Save and load adapters: ``adapter.safetensors`` (values) + ``adapter_config.json``.

Indices are not stored for the built-in mask kinds: they are regenerated from the
seed on load and checked against a checksum, so a file costs ~2 bytes per trained
entry in bf16 (4 in fp32). Custom kinds store their indices explicitly. No pickles.

Format 2 adds a checksum of the config's own content and, per matrix, a short hash of W0 at
the kept entries (``randmask.integrity``), so a removed matrix, another checkpoint of the same
architecture, or a base that already has the delta merged in are refused at load.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save as st_save
from torch import nn

from randmask.adapter import Block, MaskAdapter
from randmask.adapter_files import CONFIG_NAME, FORMAT, FORMAT_VERSION, WEIGHTS_NAME, read_adapter_files
from randmask.config import MaskingConfig, MaskingError
from randmask.drawing import block_densities, draw_mask
from randmask.files import atomic_write_bytes
from randmask.integrity import (
    CONFIG_CHECKSUM_KEY,
    base_fingerprint,
    check_base,
    check_blocks,
    check_explicit_indices,
    config_checksum,
)
from randmask.layer import MaskedLayer, is_conv1d, is_maskable, logical_shape
from randmask.masks import BUILTIN_KINDS, MASK_KIND_VERSIONS, indices_checksum
from randmask.model import attach_adapter
from randmask.quantized import base_entries, quant_scheme, stored_shape
from randmask.registry import adapter_meta, adapter_names, masked_layers
from randmask.sharding import full_tensor, is_sharded
from randmask.summary import count_base_parameters
from randmask.targets import Target
from randmask.version import __version__


def _save_dtype(layer: MaskedLayer, dtype: torch.dtype | None) -> torch.dtype:
    # Half-precision weights hold W0 (+) values.to(half): saving values in that dtype
    # reproduces the weight bit for bit at ~2 bytes per entry. The delta path (quantized base)
    # computes with the fp32 values themselves, so they are saved whole.
    if dtype is not None:
        return dtype
    if layer.delta_path:
        return torch.float32
    weight_dtype = layer.weight.dtype
    return weight_dtype if weight_dtype in (torch.float16, torch.bfloat16, torch.float64) else torch.float32


def save_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default",
                 dtype: torch.dtype | None = None) -> Path:
    """Write the adapter to folder ``path`` (created if needed); returns the folder.

    A model sharded with FSDP2 (``fully_shard``: its values are DTensors): call it on every rank; the values are
    gathered and rank 0 writes the file, the same bytes as an unsharded model's.
    """
    meta = adapter_meta(model, adapter_name)
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise MaskingError(f"{out} is a file; save_adapter writes a folder (adapter_config.json + "
                           "adapter.safetensors). Pass a folder path.")
    tensors: dict[str, torch.Tensor] = {}
    matrices: dict[str, dict] = {}
    sharded = False
    for name, layer in masked_layers(model).items():
        if adapter_name not in layer.adapters:
            continue
        adapter = layer.adapters[adapter_name]
        sharded = sharded or is_sharded(adapter.values)
        matrices[name] = _save_matrix(name, layer, adapter, dtype, tensors)
    blob = st_save(tensors, metadata={"format": FORMAT})
    header = _adapter_header(model, meta, matrices, blob)
    if sharded and torch.distributed.get_rank() != 0:
        return out  # rank 0 writes
    atomic_write_bytes(out / WEIGHTS_NAME, blob)
    atomic_write_bytes(out / CONFIG_NAME, (json.dumps(header, indent=1) + "\n").encode())
    return out


def _save_matrix(name: str, layer: MaskedLayer, adapter: MaskAdapter, dtype: torch.dtype | None,
                 tensors: dict[str, torch.Tensor]) -> dict:
    """Put one layer's values (and stored indices) into ``tensors``; returns its entry of the header's matrices."""
    values = full_tensor(adapter.values.detach())  # a collective for DTensor values
    if not torch.isfinite(values).all():
        raise MaskingError(f"adapter values of {name} are not finite (NaN/inf): training diverged. "
                           "Lower the learning rate; nothing was saved.")
    tensors[f"{name}.values"] = values.to(_save_dtype(layer, dtype)).cpu().contiguous()
    if adapter.explicit_indices:
        tensors[f"{name}.indices"] = adapter.indices.cpu().to(torch.int64)
    return {
        "stored_shape": list(adapter.stored_shape),
        "transposed": adapter.transposed,
        "blocks": [[b.name, b.start, b.stop, b.nnz] for b in adapter.blocks],
        "nnz": adapter.nnz,
        "indices_checksum": indices_checksum(adapter.indices),
        "explicit_indices": adapter.explicit_indices,
        # Pristine W0 at the kept entries: held by the active adapter, else read from the (restored) weight.
        "base_fingerprint": base_fingerprint(adapter.base_values if adapter.base_values is not None
                                             else _pristine_entries(layer, adapter.indices)),
    }


def _adapter_header(model: nn.Module, meta: dict, matrices: dict[str, dict], blob: bytes) -> dict:
    """The adapter config (JSON) for weights file ``blob``, checksummed over itself."""
    config: MaskingConfig = meta["config"]
    model_cfg = getattr(model, "config", None)
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "masking_config": config.to_dict(),
        "mask_kind_version": MASK_KIND_VERSIONS.get(config.mask_kind, 1),
        "total_params": meta["total_params"],
        "trainable": sum(m["nnz"] for m in matrices.values()),
        "base_model": {"model_type": getattr(model_cfg, "model_type", None),
                       "name_or_path": getattr(model_cfg, "_name_or_path", None)},
        "matrices": matrices,
        "weights_sha256": hashlib.sha256(blob).hexdigest(),
    }
    header[CONFIG_CHECKSUM_KEY] = config_checksum(header)
    return header


def load_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default",
                 is_trainable: bool = False, verify_base: bool = True) -> nn.Module:
    """Load an adapter saved by ``save_adapter`` onto ``model`` (its base model), in place.

    Checks, before allocating anything sized by the file, that the file is whole (checksums)
    and belongs to this base (module names, shapes, parameter count, regenerated-mask
    checksums), then that W0 at the kept entries matches the saved base fingerprint (another
    checkpoint, or one with the delta already merged, is refused; ``verify_base=False`` skips
    only this last check). ``is_trainable=True`` makes the values trainable (to resume
    training); otherwise everything is frozen, as PEFT's ``from_pretrained`` does.
    """
    header, tensors = read_adapter_files(path, max_entries=count_base_parameters(model))
    config = MaskingConfig.from_dict(header["masking_config"])
    if adapter_name in adapter_names(model):
        raise MaskingError(f"model already has an adapter named {adapter_name!r}; pass another "
                           "adapter_name to load a second adapter, or randmask.unload(model) first.")
    total = _check_base_model(model, header)
    explicit = config.mask_kind not in BUILTIN_KINDS
    _check_mask_kind_version(header, config.mask_kind, explicit)
    modules = dict(model.named_modules())
    targets, saved_values = _saved_targets(modules, header, tensors, config, explicit)
    masks = _loaded_masks(modules, header, tensors, config, total, targets, explicit, verify_base)
    attach_adapter(model, adapter_name, config, total, masks, explicit_indices=explicit, values=saved_values,
                   trainable=is_trainable)
    return model


def _saved_targets(modules: dict[str, nn.Module], header: dict, tensors: dict[str, torch.Tensor],
                   config: MaskingConfig, explicit: bool) -> tuple[list[Target], dict[str, torch.Tensor]]:
    """The saved matrices in saved order as targets of this model, and their checked values."""
    targets, saved_values = [], {}
    for name, info in header["matrices"].items():
        module = _saved_module(modules, name, info)
        check_blocks(name, info, *logical_shape(module))
        if info["explicit_indices"] != explicit:
            raise MaskingError(f"{name}: explicit_indices={info['explicit_indices']} contradicts mask_kind "
                               f"{config.mask_kind!r}; the adapter config was edited. Re-save the adapter.")
        saved_values[name] = _saved_values(name, tensors[f"{name}.values"], info["nnz"])
        targets.append(Target(name, module, [(b[0], b[1], b[2]) for b in info["blocks"]]))
    return targets, saved_values


def _loaded_masks(modules: dict[str, nn.Module], header: dict, tensors: dict[str, torch.Tensor],
                  config: MaskingConfig, total: int, targets: list[Target], explicit: bool,
                  verify_base: bool) -> list[tuple[Target, torch.Tensor, list[Block]]]:
    """Each target's mask (regenerated from the seed, or the stored indices), checked against the saved
    checksum and, with ``verify_base``, W0 at its entries against the saved base fingerprint."""
    # The saved matrices in saved order are apply_masking's targets: the same budget call gives
    # the same floats, hence the same regenerated masks.
    has_budget = config.density is not None or config.trainable_ratio is not None
    densities = block_densities(config, total, targets) if has_budget and not explicit else [None] * len(targets)
    masks = []
    for target, target_densities in zip(targets, densities):
        info = header["matrices"][target.name]
        if explicit:
            indices = check_explicit_indices(target.name, tensors[f"{target.name}.indices"], info,
                                             logical_shape(target.module), is_conv1d(target.module))
        else:  # bounded: check_blocks tied every block to a real (rows x in) range of this model
            indices, _ = draw_mask(target, target_densities, config)
        if indices_checksum(indices) != info["indices_checksum"]:
            raise MaskingError(f"{target.name}: the mask regenerated from seed {config.seed} does not match the "
                               "saved checksum: the adapter was saved from another base model or "
                               "randmask version, or its config was edited.")
        if verify_base:
            _verify_base(target.name, modules[target.name], indices, info["base_fingerprint"])
        masks.append((target, indices, [Block(*b) for b in info["blocks"]]))
    return masks


def _check_mask_kind_version(header: dict, kind: str, explicit: bool) -> None:
    """A built-in kind's mask is regenerated from the seed: it must be the sampler version that drew it."""
    saved = header.get("mask_kind_version", 1)  # files written before the field existed: version 1
    if explicit or saved == MASK_KIND_VERSIONS.get(kind, 1):
        return
    raise MaskingError(f"adapter mask_kind {kind!r} was drawn by sampler version {saved!r}; this randmask "
                       f"({__version__}) draws version {MASK_KIND_VERSIONS.get(kind, 1)}, so its mask cannot be "
                       "regenerated. Load it with the randmask that saved it, or train it again.")


def _check_base_model(model: nn.Module, header: dict) -> int:
    """Same model_type and parameter count as at save; returns the parameter count."""
    saved_type = header["base_model"].get("model_type")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if saved_type and model_type and saved_type != model_type:
        raise MaskingError(f"adapter was saved from a {saved_type!r} model; this model is {model_type!r}. "
                           "Load it onto the base model it was trained from.")
    total = count_base_parameters(model)
    if total != header["total_params"]:
        raise MaskingError(f"adapter was saved from a base model with {header['total_params']:,} parameters; "
                           f"this model has {total:,}. Load it onto the base model it was trained from.")
    return total


def _saved_module(modules: dict[str, nn.Module], name: str, info: dict) -> nn.Module:
    """The Linear/Conv1D that adapter matrix ``name`` belongs to, with the saved shape and layout."""
    module = modules.get(name)
    module = module.base_layer if isinstance(module, MaskedLayer) else module
    if module is None or not is_maskable(module):
        raise MaskingError(f"adapter matrix {name!r} is not a Linear/Conv1D module of this model; the "
                           "adapter was saved from another base model (module names differ).")
    if list(stored_shape(module)) != info["stored_shape"] or is_conv1d(module) != info["transposed"]:
        raise MaskingError(f"{name}: adapter shape {info['stored_shape']} (transposed={info['transposed']}) != "
                           f"model weight shape {list(stored_shape(module))}; the adapter was saved from another "
                           "base model.")
    return module


def _saved_values(name: str, values: torch.Tensor, nnz: int) -> torch.Tensor:
    if not values.is_floating_point() or values.ndim != 1 or values.numel() != nnz:
        raise MaskingError(f"{name}: values must be {nnz} floats in {WEIGHTS_NAME}; got {values.dtype} of shape "
                           f"{tuple(values.shape)}. The file is corrupt: re-save the adapter.")
    if not torch.isfinite(values).all():
        raise MaskingError(f"{name}: adapter values are not finite (NaN/inf); refusing to load.")
    return values


def _verify_base(name: str, module: nn.Module, indices: torch.Tensor, saved: dict[str, str]) -> None:
    """``check_base`` on W0 at the kept entries (dequantized on a quantized base)."""
    base = module.base_layer if isinstance(module, MaskedLayer) else module
    check_base(name, _pristine_entries(module, indices), saved, scheme=quant_scheme(base))


def _pristine_entries(module: nn.Module, indices: torch.Tensor) -> torch.Tensor:
    """W0 at ``indices`` of a masked layer (its delta taken out for the read) or of a plain one."""
    return module.pristine_entries(indices) if isinstance(module, MaskedLayer) else base_entries(module, indices)
