"""SHiRA interop: export a randmask adapter as a stock PEFT SHiRA adapter, and import one back.

PEFT's SHiRA (peft.tuners.shira) stores, per ``nn.Linear``, ``shira_weight`` (fp32, k values)
and ``shira_indices`` (int32, (2, k): output row, input column), and its layers are built with
exactly ``k = r * (in + out)`` entries for one ``r`` shared by all modules. So the export pads
each matrix with zero-valued entries outside the mask up to that count (the delta is unchanged)
and the file costs ~12 bytes per entry, against randmask's ~2 (bf16 values, indices regenerated
from the seed). Needs peft (imported by ``randmask.peft``).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from peft import ShiraConfig
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from randmask.adapter_files import read_adapter_files
from randmask.config import MaskingConfig, MaskingError
from randmask.drawing import block_densities, draw_mask
from randmask.files import atomic_write_bytes, parse_json, read_limited
from randmask.integrity import check_blocks, check_draw_size
from randmask.layer import MaskedLayer, is_conv1d
from randmask.masks import BUILTIN_KINDS, indices_checksum
from randmask.model import apply_masking
from randmask.peft_layer import RandMaskLayer
from randmask.quantized import stored_shape
from randmask.registry import masked_layers
from randmask.summary import count_base_parameters
from randmask.targets import Target

SHIRA_CONFIG = "adapter_config.json"
SHIRA_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
MAX_EXPORT_ENTRIES = 1 << 27  # entries of an exported file (~1.6 GB): past it, pass max_entries= on purpose
MAX_SHIRA_CONFIG_BYTES = 1 << 20


def export_shira(model_or_adapter_dir: nn.Module | str | os.PathLike, out_dir: str | os.PathLike,
                 adapter_name: str = "default", max_entries: int = MAX_EXPORT_ENTRIES) -> Path:
    """Write a PEFT SHiRA adapter equal to a randmask adapter; stock ``PeftModel.from_pretrained`` loads it.

    The source is a model carrying the adapter (a ``get_peft_model``/``from_pretrained`` RandMask
    PeftModel, or a model from ``randmask.apply_masking``/``load_adapter``), or a folder written by
    ``randmask.save_adapter``. A folder holds no model to check its shapes against, so everything it
    makes the export allocate is bounded before it is allocated: the SHiRA file holds at most
    ``max_entries`` entries (12 bytes each). Returns ``out_dir``.
    """
    if isinstance(model_or_adapter_dir, nn.Module):
        matrices, name_or_path = _from_model(model_or_adapter_dir, adapter_name), _name_or_path(model_or_adapter_dir)
        if matrices:
            _check_export_size({n: (v.numel(), shape) for n, (_, _, v, shape) in matrices.items()}, max_entries,
                               folder=False)
    else:
        matrices, name_or_path = _from_folder(Path(model_or_adapter_dir), max_entries)
    if not matrices:
        raise MaskingError(f"no randmask adapter {adapter_name!r} found to export.")
    r = _shared_rank({n: (v.numel(), shape) for n, (_, _, v, shape) in matrices.items()})
    tensors = {}
    for name, (rows, cols, values, (out_f, in_f)) in matrices.items():
        k = r * (out_f + in_f)
        if k > out_f * in_f:
            raise MaskingError(f"{name}: SHiRA needs r*(in+out) = {k} entries but the matrix has {out_f * in_f}; "
                               "this adapter's density is too high for SHiRA's format.")
        rows, cols, values = _pad(rows, cols, values, k, in_f)
        tensors[f"{_PEFT_PREFIX}{name}.shira_weight"] = values.to(torch.float32).contiguous()
        tensors[f"{_PEFT_PREFIX}{name}.shira_indices"] = torch.stack([rows, cols]).to(torch.int32).contiguous()
    config = ShiraConfig(r=r, target_modules=sorted(matrices), base_model_name_or_path=name_or_path,
                         inference_mode=True)
    out = Path(out_dir)
    atomic_write_bytes(out / SHIRA_WEIGHTS, st_save(tensors, metadata={"format": "pt"}))
    body = {k: v for k, v in config.to_dict().items() if k != "mask_fn"}
    body["target_modules"] = sorted(matrices)
    atomic_write_bytes(out / SHIRA_CONFIG, (json.dumps(body, indent=2, sort_keys=True) + "\n").encode())
    return out


def _shared_rank(sizes: dict[str, tuple[int, tuple[int, int]]]) -> int:
    """SHiRA's one r for every module (it has no per-module rank): the smallest that holds each mask."""
    return max(math.ceil(nnz / (out_f + in_f)) for nnz, (out_f, in_f) in sizes.values())


def _check_export_size(sizes: dict[str, tuple[int, tuple[int, int]]], max_entries: int, folder: bool) -> None:
    """The export's entry count, r * (in + out) summed over the matrices, within ``max_entries``: checked from
    the entry counts and shapes alone, before any mask is drawn or padded."""
    r = _shared_rank(sizes)
    total = sum(r * (out_f + in_f) for _, (out_f, in_f) in sizes.values())
    if total > max_entries:
        why = ("the adapter's shapes or entry counts are far larger than a real model's (an edited config?). Export "
               "from the loaded model instead, or pass a larger max_entries if this is intended" if folder else
               "SHiRA pads every matrix to r*(in+out) entries. Pass a larger max_entries if this is intended")
        raise MaskingError(f"the SHiRA export would hold {total:,} entries (r={r} over {len(sizes)} matrices), "
                           f"above max_entries={max_entries:,}: {why}.")


def _pad(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, k: int,
         in_f: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Add k - nnz zero-valued entries outside the mask (the first free ones in row-major order)."""
    need = k - values.numel()
    if need == 0:
        return rows, cols, values
    flat = rows * in_f + cols
    # Among the first nnz + need row-major positions at most nnz are taken, so need are free.
    candidates = torch.arange(flat.numel() + need, dtype=torch.int64)
    free = candidates[~torch.isin(candidates, flat)][:need]
    return (torch.cat([rows, free // in_f]), torch.cat([cols, free % in_f]),
            torch.cat([values, values.new_zeros(need)]))


def _logical(name: str, indices: torch.Tensor, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    if is_conv1d(module):
        raise MaskingError(f"{name} is a transformers Conv1D (GPT-2); PEFT's SHiRA supports torch.nn.Linear "
                           "only, so this adapter cannot be exported to SHiRA.")
    in_f = stored_shape(module)[1]
    return torch.div(indices, in_f, rounding_mode="floor"), indices % in_f


def _from_model(model: nn.Module, adapter_name: str) -> dict[str, tuple]:
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, RandMaskLayer) and adapter_name in module.randmask_adapters:
            adapter, base = module.randmask_adapters[adapter_name], module.get_base_layer()
        elif isinstance(module, MaskedLayer) and adapter_name in module.adapters:
            adapter, base = module.adapters[adapter_name], module.base_layer
        else:
            continue
        rows, cols = _logical(name, adapter.indices.cpu(), base)
        out[name.removeprefix(_PEFT_PREFIX)] = (rows, cols, adapter.values.detach().cpu().float(),
                                                stored_shape(base))
    return out


def _from_folder(folder: Path, max_entries: int) -> tuple[dict[str, tuple], str | None]:
    header, tensors = read_adapter_files(folder, max_entries=max_entries)
    config = MaskingConfig.from_dict(header["masking_config"])
    targets, explicit = [], config.mask_kind not in BUILTIN_KINDS
    for name, info in header["matrices"].items():
        if info["transposed"]:
            raise MaskingError(f"{name} is a transformers Conv1D (GPT-2); PEFT's SHiRA supports torch.nn.Linear "
                               "only, so this adapter cannot be exported to SHiRA.")
        out_f, in_f = info["stored_shape"]
        check_blocks(name, info, out_f, in_f)
        if tensors[f"{name}.values"].numel() != info["nnz"]:
            raise MaskingError(f"{name}: {folder} holds {tensors[f'{name}.values'].numel()} values for "
                               f"{info['nnz']} entries; the adapter files are damaged. Re-save the adapter.")
        stub = nn.Linear(in_f, out_f, bias=False, device="meta")
        targets.append(Target(name, stub, [(b[0], b[1], b[2]) for b in info["blocks"]]))
    _check_export_size({n: (info["nnz"], tuple(info["stored_shape"])) for n, info in header["matrices"].items()},
                       max_entries, folder=True)
    densities = [None] * len(targets) if explicit else block_densities(config, header["total_params"], targets)
    out = {}
    for target, target_densities in zip(targets, densities):
        info = header["matrices"][target.name]
        if explicit:
            indices = tensors[f"{target.name}.indices"]
        else:  # bounded: a mask whose expected size is far from the saved count is refused before it is drawn
            check_draw_size(target.name, info, target_densities, config.mask_kind)
            indices = draw_mask(target, target_densities, config)[0]
        if indices.numel() != info["nnz"] or indices_checksum(indices) != info["indices_checksum"]:
            raise MaskingError(f"{target.name}: the mask regenerated from {folder} does not match its saved "
                               "checksum; the adapter config was edited. Re-save the adapter.")
        rows, cols = _logical(target.name, indices, target.module)
        out[target.name] = (rows, cols, tensors[f"{target.name}.values"].float(), tuple(info["stored_shape"]))
    return out, header["base_model"].get("name_or_path")


def _name_or_path(model: nn.Module) -> str | None:
    config = getattr(model, "config", None) or getattr(getattr(model, "base_model", None), "config", None)
    return getattr(config, "_name_or_path", None) or None


def import_shira(shira_dir: str | os.PathLike, model: nn.Module, adapter_name: str = "default") -> nn.Module:
    """Apply a PEFT SHiRA adapter to ``model`` (its base) as a custom-mask randmask adapter, in place.

    The base model is needed: SHiRA files hold no shapes, and randmask records the base's
    fingerprint. Save the result with ``randmask.save_adapter``.
    """
    folder = Path(shira_dir)
    fix = "it is not a readable PEFT SHiRA adapter: pass a folder written by PEFT's SHiRA save_pretrained"
    config = parse_json(read_limited(folder / SHIRA_CONFIG, MAX_SHIRA_CONFIG_BYTES, "PEFT SHiRA adapter config",
                                     fix=fix), str(folder / SHIRA_CONFIG), "PEFT SHiRA adapter config", fix=fix)
    # A SHiRA file holds 12 bytes per entry, and entries lie in the model's Linear weights: 16 bytes per base
    # parameter (plus the header) bounds any real one.
    limit = 16 * count_base_parameters(model) + (1 << 20)
    blob = read_limited(folder / SHIRA_WEIGHTS, limit, "PEFT SHiRA adapter weights", fix=fix)
    try:
        tensors = st_load(blob)
    except (SafetensorError, ValueError) as e:
        raise MaskingError(f"{folder} is not a readable PEFT SHiRA adapter ({str(e)[:100]}).") from None
    if not isinstance(config, dict) or config.get("peft_type") != "SHIRA":
        raise MaskingError(f"{folder / SHIRA_CONFIG} is not a SHiRA adapter config (peft_type != 'SHIRA').")
    masks, values = {}, {}
    modules = dict(model.named_modules())
    for key in tensors:
        if not key.endswith(".shira_weight"):
            continue
        name = key.removeprefix(_PEFT_PREFIX).removesuffix(".shira_weight")
        masks[name], values[name] = _shira_entries(name, modules.get(name), tensors, key)
    if not masks:
        raise MaskingError(f"{folder / SHIRA_WEIGHTS} holds no shira_weight tensors.")
    apply_masking(model, MaskingConfig(mask_kind="custom", targets=sorted(masks)), adapter_name=adapter_name,
                  custom_masks=masks)
    layers = masked_layers(model)
    with torch.no_grad():
        for name, vals in values.items():
            layers[name].adapters[adapter_name].values.copy_(vals)
            layers[name].sync()
    return model


def _shira_entries(name: str, module: nn.Module | None, tensors: dict[str, torch.Tensor],
                   key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted flat row-major indices, values in that order) of one SHiRA matrix, checked."""
    if not isinstance(module, nn.Linear):
        raise MaskingError(f"SHiRA matrix {name!r} is not an nn.Linear of this model; pass the base model the "
                           "adapter was trained on.")
    weight, idx = tensors[key], tensors.get(key.replace(".shira_weight", ".shira_indices"))
    if idx is None or idx.is_floating_point() or idx.ndim != 2 or idx.shape[0] != 2 or \
            weight.ndim != 1 or idx.shape[1] != weight.numel() or not weight.is_floating_point():
        raise MaskingError(f"{name}: shira_indices must be (2, k) integers beside k float shira_weight values.")
    if not torch.isfinite(weight).all():
        raise MaskingError(f"{name}: shira_weight holds NaN or inf values; the adapter is broken (training diverged "
                           "or the file was edited). Refusing to import it.")
    out_f, in_f = stored_shape(module)
    rows, cols = idx[0].to(torch.int64), idx[1].to(torch.int64)
    if ((rows < 0) | (rows >= out_f) | (cols < 0) | (cols >= in_f)).any():
        raise MaskingError(f"{name}: shira_indices fall outside the {out_f}x{in_f} weight; wrong base model.")
    flat = rows * in_f + cols
    order = torch.argsort(flat)
    return flat[order], weight.float()[order]


__all__ = ["export_shira", "import_shira"]
