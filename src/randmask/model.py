"""Apply Random Masking to a model, and the adapters' lifecycle on it: add, switch (the O(nnz) hot swap), delete,
disable, and mixed batches (one adapter per sample). Summaries live in ``randmask.summary``, merging and unloading
in ``randmask.unwrap``, the per-model registry in ``randmask.registry``."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from randmask.adapter import Block
from randmask.config import MaskingConfig, MaskingError
from randmask.drawing import block_densities, draw_mask
from randmask.layer import MaskedLayer
from randmask.masks import BUILTIN_KINDS, get_sampler
from randmask.mixed import check_adapter_names, group_rows, row_groups_set
from randmask.paths import mark_shared_weight
from randmask.quantized import check_weight, disable_bnb_cpu_repacking
from randmask.registry import (
    adapter_meta,
    adapter_names,
    cached_layers,
    disabled_depth,
    forget_adapter,
    forget_layers,
    masked_layers,
    record_adapter,
    refuse_in_mixed_batch,
    set_disabled_depth,
)
from randmask.registry import adapter_names as registered_adapters  # for mixed_batch, whose parameter shadows it
from randmask.summary import count_base_parameters, masking_summary
from randmask.targets import Target, resolve_targets, weight_ties
from randmask.unwrap import unload
from randmask.warn import warn_caller

logger = logging.getLogger("randmask")


def attach_adapter(model: nn.Module, adapter_name: str, config: MaskingConfig, total_params: int,
                   masks: list[tuple[Target, torch.Tensor, list[Block]]], explicit_indices: bool,
                   values: dict[str, torch.Tensor] | None = None, trainable: bool = True) -> None:
    """Freeze ``model``, wrap each target and add adapter ``adapter_name`` with these indices.

    The one attach path of ``apply_masking`` (zero values, trainable) and ``load_adapter``
    (saved ``values`` by module name). Records (config, total_params) for the summary and saving.
    The new adapter is the active one on every masked layer: a layer it does not adapt computes with W0, so an
    earlier adapter on other modules never stays live beside it. Refused inside ``mixed_batch``.
    """
    if adapter_name in adapter_names(model):
        raise MaskingError(
            f"adapter {adapter_name!r} is already applied to this model. Call randmask.unload(model) "
            "first, or pass another adapter_name to add a second adapter."
        )
    refuse_in_mixed_batch(model, f"adding adapter {adapter_name!r}")
    earlier = adapter_names(model)
    for target, _, _ in masks:  # before any change: a refused model stays as it was
        check_weight(target.name, target.module)
    for param in model.parameters():
        param.requires_grad_(False)
    disable_bnb_cpu_repacking(model)  # gradients pass through every frozen 4-bit layer, on any CPU
    ties = tied_targets(model, [target for target, _, _ in masks])
    for target, indices, blocks in masks:
        layer = _wrap(model, target, ties.get(target.name, ()))
        adapter = layer.add_adapter(adapter_name, indices, blocks, config.mask_kind, explicit_indices)
        if values is not None:
            with torch.no_grad():
                adapter.values.copy_(values[target.name].to(adapter.values.dtype))
            layer.sync()
        adapter.values.requires_grad_(trainable)
    record_adapter(model, adapter_name, config, total_params)
    if earlier:  # the layers only an earlier adapter adapts hand over to W0
        _activate(model, adapter_name)




def apply_masking(model: nn.Module, config: MaskingConfig, adapter_name: str = "default",
                  custom_masks: dict[str, torch.Tensor] | None = None, verbose: bool = False) -> nn.Module:
    """Freeze ``model`` and make a random subset of the targeted weights trainable, in place.

    Each targeted matrix gets an independent mask drawn from (config.seed, module name);
    the trainable parameters are one 1-D ``values`` tensor (the delta) per matrix.
    With ``mask_kind="custom"``, ``custom_masks`` maps module names to a bool (out, in)
    mask or flat row-major integer indices. Returns ``model`` (wrapped layers replace the targets).
    """
    config.validate()
    if adapter_name in adapter_names(model):
        raise MaskingError(
            f"adapter {adapter_name!r} is already applied to this model. Call randmask.unload(model) "
            "first, or pass another adapter_name to add a second adapter."
        )
    if config.mask_kind == "custom" and not custom_masks:
        raise MaskingError("mask_kind='custom' needs custom_masks={module name: bool mask or indices}.")
    if custom_masks and config.mask_kind != "custom":
        raise MaskingError(f"custom_masks were given with mask_kind={config.mask_kind!r}; they are used only "
                           "with mask_kind='custom'. Set mask_kind='custom' or drop custom_masks.")
    if config.mask_kind != "custom":
        get_sampler(config.mask_kind)  # unknown kind: clear error before any work

    targets = resolve_targets(model, config.targets, config.exclude)
    if custom_masks:
        unknown = sorted(set(custom_masks) - {t.name for t in targets})
        if unknown:
            raise MaskingError(f"custom_masks name modules that are not targets: {unknown}. Targets: "
                               f"{[t.name for t in targets]}.")
    total = count_base_parameters(model)
    densities = block_densities(config, total, targets)
    masks = []
    for target, target_densities in zip(targets, densities):
        custom = None
        if config.mask_kind == "custom":
            custom = custom_masks.get(target.name)
            if custom is None:
                raise MaskingError(f"custom_masks has no entry for target {target.name!r}.")
        masks.append((target, *draw_mask(target, target_densities, config, custom)))
    attach_adapter(model, adapter_name, config, total, masks, explicit_indices=config.mask_kind not in BUILTIN_KINDS)
    summary = masking_summary(model, adapter_name)
    (print if verbose else logger.info)(str(summary))
    return model


def tied_targets(model: nn.Module, targets: list[Target]) -> dict[str, tuple[str, ...]]:
    """``weight_ties(model, targets)``, said once per attach (one message for both APIs): which targets are tied,
    and what that changes."""
    ties = weight_ties(model, targets)
    if ties:
        listed = "; ".join(f"{name} with {', '.join(others)}" for name, others in ties.items())
        warn_caller(f"tied weights ({listed}): each such target adds its delta beside the weight, so the modules "
                    "it is tied to keep W0, and merging it is refused. To merge, untie before masking.")
    return ties


def _wrap(model: nn.Module, target: Target, shared_with: tuple[str, ...]) -> MaskedLayer:
    existing = model.get_submodule(target.name)
    if isinstance(existing, MaskedLayer):
        return existing
    forget_layers(model)
    mark_shared_weight(existing, shared_with)  # before any adapter: a tied weight is never written
    layer = MaskedLayer(existing)
    layer.disabled = disabled_depth(model) > 0  # wrapped inside disable_adapter: W0 until the block ends
    parent_name, _, child = target.name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
    return layer






def set_adapter(model: nn.Module, adapter_name: str, inference_mode: bool = False) -> None:
    """Make ``adapter_name`` the active adapter of every masked layer (others restored to W0), and, as PEFT's
    ``set_adapter`` does, its values the trainable ones (frozen with ``inference_mode=True``; the others frozen).

    The hot-swap: per layer W0 is written back at the old adapter's entries and W0 + values at the
    new one's, O(nnz) in all: no reload, no dense copy. The layers are found once and cached (the
    cache is dropped whenever randmask wraps or unwraps a layer).
    """
    if not isinstance(inference_mode, bool):
        raise MaskingError(f"inference_mode must be True or False, got {inference_mode!r}.")
    _activate(model, adapter_name)
    for layer in cached_layers(model):
        for name, adapter in layer.adapters.items():
            adapter.values.requires_grad_(name == adapter_name and not inference_mode)


def _activate(model: nn.Module, adapter_name: str) -> None:
    """``adapter_name`` active on every masked layer that has it (W0 on the others); trainability unchanged."""
    adapter_meta(model, adapter_name)
    for layer in cached_layers(model):
        layer.set_active(adapter_name if adapter_name in layer.adapters else None)


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove adapter ``adapter_name`` and free its values, indices and layouts, as PEFT's ``delete_adapter``.

    Deleting the active adapter writes W0 back at its entries and makes the first remaining adapter active, with a
    warning (as PEFT does); deleting the last one unwraps every layer, leaving the pristine base model (``unload``).
    Refused inside ``mixed_batch``.
    """
    adapter_meta(model, adapter_name)
    refuse_in_mixed_batch(model, f"delete_adapter({adapter_name!r})")
    layers = masked_layers(model)
    was_active = any(layer.active_adapter == adapter_name for layer in layers.values())
    remaining = [name for name in adapter_names(model) if name != adapter_name]
    if not remaining:
        unload(model)
        return
    for layer in layers.values():
        if adapter_name in layer.adapters:
            if layer.active_adapter == adapter_name:
                layer.set_active(None)  # W0 back at its entries
            del layer.adapters[adapter_name]
    forget_adapter(model, adapter_name)
    if was_active:
        warn_caller(f"adapter {adapter_name!r} was active and is deleted; {remaining[0]!r} is active now "
                    "(call randmask.set_adapter to choose another).", UserWarning)
        _activate(model, remaining[0])


@contextlib.contextmanager
def disable_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager: inside it the model computes with the pristine pretrained weights.

    Adapters added inside start disabled too; ``unload`` or ``merge_and_unload`` inside it take effect at once
    (the model they return is an ordinary one, as PEFT's). Nested blocks end with the outermost. Refused inside
    ``mixed_batch``, whose per-sample adapters it would not turn off."""
    refuse_in_mixed_batch(model, "disable_adapter()")
    depth = disabled_depth(model)
    set_disabled_depth(model, depth + 1)
    for layer in masked_layers(model).values():
        layer.restore_base()
        layer.disabled = True
    try:
        yield model
    finally:
        set_disabled_depth(model, depth)
        if depth == 0:
            for layer in masked_layers(model).values():  # the layers now in the model: some may be new or gone
                layer.disabled = False
                layer.sync()


@contextlib.contextmanager
def mixed_batch(model: nn.Module, adapter_names: Sequence[str], rows_per_name: int = 1) -> Iterator[nn.Module]:
    """Context manager: each sample of the batch runs through its own adapter (``"__base__"``: none).

    ``adapter_names`` holds one name per sample, as PEFT's ``adapter_names=`` does; with
    ``generate(num_beams=k)`` (or ``num_return_sequences=k``) pass one per prompt and
    ``rows_per_name=k``. Inside, every masked layer keeps W0 in its weight and adds each sample
    group's sparse delta (``randmask.mixed``); on exit the active adapter is written back (O(nnz)).
    The outputs equal running each sample alone with its adapter set. Inference only (the model
    must be in eval mode, as PEFT requires), not inside ``disable_adapter``, and not nested.
    """
    groups = group_rows(adapter_names, rows_per_name)
    known = registered_adapters(model)  # (the parameter shadows adapter_names())
    check_adapter_names(groups, known)
    groups = groups.with_slots(known)
    if model.training:
        raise MaskingError("mixed batches are for inference: call model.eval() first (PEFT refuses adapter_names "
                           "in training mode too).")
    layers = list(masked_layers(model).values())
    if any(layer.disabled for layer in layers):
        raise MaskingError("mixed_batch inside disable_adapter(): name '__base__' for the samples that should run "
                           "without an adapter instead.")
    with row_groups_set(layers, groups):
        for layer in layers:
            layer.restore_base()  # W0 at the active adapter's entries: the delta path's base
        try:
            yield model
        finally:
            for layer in masked_layers(model).values():  # not those unwrapped inside (unload): they are gone
                layer.row_groups = None
                layer.sync()


__all__ = ["apply_masking", "attach_adapter", "delete_adapter", "disable_adapter", "mixed_batch", "set_adapter",
           "tied_targets"]
