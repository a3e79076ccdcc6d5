"""Serving on the PEFT path: ``adapter_names=[...]`` mixed batches and ``add_weighted_adapter`` merges.

Used by ``randmask.peft.RandMaskModel`` only, so peft is installed when it runs. The work itself is
the library's: ``randmask.mixed`` (the delta path per sample group) and ``randmask.merge``; peft's own
``modules_to_save`` copies get the names too, as PEFT's LoRA gives them (each row through its adapter's copy).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from peft.utils import AuxiliaryTrainingWrapper
from torch import nn

from randmask.adapter import MaskAdapter
from randmask.config import MaskingError
from randmask.merge import check_merge_args, merge_layer_adapters, union_blocks
from randmask.mixed import RowGroups, check_adapter_names, group_rows, row_groups_set
from randmask.paths import uses_delta_path
from randmask.peft_layer import RandMaskLayer
from randmask.quantized import base_entries, stored_shape


def _layers(model: nn.Module) -> list[RandMaskLayer]:
    return [m for m in model.modules() if isinstance(m, RandMaskLayer)]


def _rows_per_prompt(kwargs: dict[str, Any], model: nn.Module) -> int:
    """How many rows ``generate`` makes of each prompt: num_beams for beam search, else num_return_sequences; each
    read as transformers does: the keyword, else the ``generation_config`` passed, else the model's own."""
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    def pick(key: str) -> int:
        value = kwargs.get(key, getattr(config, key, None))
        return int(value) if isinstance(value, int) and value > 1 else 1
    beams = pick("num_beams")
    return beams if beams > 1 else pick("num_return_sequences")


@contextlib.contextmanager
def peft_mixed_batch(tuner: nn.Module, kwargs: dict[str, Any]) -> Iterator[None]:
    """``RandMaskModel._enable_peft_forward_hooks``: honour ``adapter_names`` (one per sample), refuse aLoRA."""
    adapter_names = kwargs.get("adapter_names")
    if kwargs.get("alora_offsets") is not None:
        raise MaskingError("alora_offsets is an aLoRA option; randmask adapters do not take it. Drop it.")
    if adapter_names is None:
        yield
        return
    if tuner.training:
        raise MaskingError("adapter_names=[...] is for inference: call model.eval() first (as PEFT requires).")
    layers, rows = _layers(tuner.model), _rows_per_prompt(kwargs, tuner.model)
    with row_groups_set(layers, _slotted_groups(layers, adapter_names, rows)), _names_to_wrappers(
            tuner.model, [name for name in adapter_names for _ in range(rows)]):
        yield


@contextlib.contextmanager
def _names_to_wrappers(model: nn.Module, names: list[str]) -> Iterator[None]:
    """Each ``modules_to_save`` copy (peft's AuxiliaryTrainingWrapper) runs every row through its own adapter's copy
    (``__base__``: the original module) while the block lasts: the names go into its forward, as LoRA's hook does."""
    def give_names(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        return args, {**kwargs, "adapter_names": names}

    handles = [module.register_forward_pre_hook(give_names, with_kwargs=True)
               for module in model.modules() if isinstance(module, AuxiliaryTrainingWrapper)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.compiler.disable  # run eagerly: traced, the names would be guarded and every new mix would recompile
def _slotted_groups(layers: list[RandMaskLayer], adapter_names: Any, rows_per_name: int) -> RowGroups:
    groups = group_rows(adapter_names, rows_per_name)
    known = {name for layer in layers for name in layer.randmask_adapters}
    check_adapter_names(groups, known)
    if any(layer.merged for layer in layers):
        raise MaskingError("adapter_names=[...] needs unmerged adapters: call model.unmerge_adapter() first.")
    return groups.with_slots(known)


def peft_add_weighted_adapter(tuner: nn.Module, adapters: Sequence[str], weights: Sequence[float],
                              adapter_name: str, combination_type: str, density: float | None,
                              majority_sign_method: str, seed: int, unsupported: dict[str, Any]) -> None:
    """``RandMaskModel.add_weighted_adapter``: a new in-memory adapter, the sparse merge of ``adapters``."""
    given = {k: v for k, v in unsupported.items() if v not in (None, True)}
    if given:
        raise MaskingError(f"add_weighted_adapter: {sorted(given)} apply to LoRA's SVD merges; randmask merges sparse "
                           "deltas exactly. Drop them.")
    missing = [a for a in adapters if a not in tuner.peft_config]
    if missing:
        raise MaskingError(f"add_weighted_adapter: no adapters {missing}; the model has {list(tuner.peft_config)}.")
    if adapter_name in tuner.peft_config:
        raise MaskingError(f"adapter {adapter_name!r} already exists (PEFT's LoRA would silently keep the old one); "
                           "pick another name or delete_adapter it first.")
    _refuse_modules_to_save(tuner, adapters)
    weights = check_merge_args(len(adapters), weights, combination_type, density, majority_sign_method)
    layers = _layers(tuner.model)
    if any(layer.merged for layer in layers):
        raise MaskingError("add_weighted_adapter needs unmerged adapters: call model.unmerge_adapter() first.")
    generator = torch.Generator().manual_seed(seed)
    for layer in layers:
        merged = merge_layer_adapters(layer.randmask_adapters, adapters, weights, combination_type, density,
                                      majority_sign_method, generator)
        if merged is None:
            continue
        sources, union, values = merged
        layer.restore_live()  # base_values must capture pristine W0
        base = layer.get_base_layer()
        merged = MaskAdapter(union, base_entries(base, union), stored_shape(base), sources[0].transposed,
                             union_blocks(sources, union), "custom", True,
                             weight=None if uses_delta_path(base) else base.weight)
        with torch.no_grad():
            merged.values.copy_(values.to(merged.values.dtype))
        merged.requires_grad_(False)
        merged.release_base()  # only the live adapter holds its W0 (RandMaskLayer._make_live)
        layer.randmask_adapters[adapter_name] = merged
    first = tuner.peft_config[adapters[0]]
    tuner.peft_config[adapter_name] = dataclasses.replace(first, merged_from=list(adapters), checksums=None,
                                                          inference_mode=True)


def _refuse_modules_to_save(tuner: nn.Module, adapters: Sequence[str]) -> None:
    """A trained ``modules_to_save`` copy has no sparse merge: the merged adapter would run the original module and
    drop it, silently (PEFT's LoRA refuses two such copies of one module; one is dropped there too)."""
    held = sorted({name for module in tuner.model.modules() if isinstance(module, AuxiliaryTrainingWrapper)
                   for name in adapters if name in getattr(module, "modules_to_save", {})})
    if held:
        raise MaskingError(f"add_weighted_adapter: adapters {held} train modules_to_save copies, which have no sparse "
                           "merge (the merged adapter would drop them). Merge adapters without modules_to_save.")


__all__ = ["peft_add_weighted_adapter", "peft_mixed_batch"]
