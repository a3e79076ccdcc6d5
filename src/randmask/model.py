"""Apply Random Masking to a model; merge, unload, disable and switch adapters; mixed batches."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from randmask.adapter import Block, MaskAdapter
from randmask.config import MaskingConfig, MaskingError
from randmask.drawing import block_densities, draw_mask
from randmask.layer import MaskedLayer, logical_shape
from randmask.masks import BUILTIN_KINDS, get_sampler
from randmask.mixed import check_adapter_names, group_rows, row_groups_set
from randmask.paths import mark_shared_weight, weight_parametrized, weight_shared_with
from randmask.quantized import check_weight, disable_bnb_cpu_repacking, logical_numel, quant_scheme
from randmask.targets import Target, resolve_targets, weight_ties
from randmask.warn import warn_caller

logger = logging.getLogger("randmask")
_META_ATTR = "randmask_adapters"  # {adapter name: {"config": MaskingConfig, "total_params": int}}
_LAYERS_ATTR = "randmask_layers"  # the masked layers, cached for set_adapter; dropped whenever one is added/removed
_GUARD_ATTR = "randmask_forward_guard"  # handle of the root pre-hook that refuses PEFT-only forward kwargs

# PEFT's forward arguments (``PeftModel.special_peft_forward_args``) that a model adapted by the free-function API
# does not honour: transformers' forward would swallow them into **kwargs and run the active adapter for every
# sample. Refused instead, with what does the job.
UNHONOURED_FORWARD_KWARGS = {
    "adapter_names": "for one adapter per sample, run the forward or generate inside "
                     "`with randmask.mixed_batch(model, adapter_names):`, or load the adapters through PEFT "
                     "(`import randmask.peft`), whose forward takes adapter_names=",
    "alora_offsets": "it belongs to PEFT's activated LoRA; randmask adapters apply to every token",
}


@dataclass
class MatrixBudget:
    """Budget of one masked matrix (a module, or one column block of a fused one)."""

    name: str
    shape: tuple[int, int]  # logical (out, in) of the matrix or block
    nnz: int

    @property
    def density(self) -> float:
        return self.nnz / (self.shape[0] * self.shape[1])


@dataclass
class MaskingSummary:
    """Per-matrix trainable counts and the achieved fraction of all base-model parameters."""

    adapter_name: str
    total_params: int
    matrices: list[MatrixBudget]

    @property
    def trainable(self) -> int:
        return sum(m.nnz for m in self.matrices)

    @property
    def ratio(self) -> float:
        return self.trainable / self.total_params

    def __str__(self) -> str:
        lines = [f"randmask adapter {self.adapter_name!r}: {self.trainable:,} trainable of "
                 f"{self.total_params:,} parameters ({100 * self.ratio:.5f}%) in {len(self.matrices)} matrices"]
        lines += [f"  {m.name:<60} {m.shape[0]}x{m.shape[1]:<8} nnz={m.nnz:<9} p={m.density:.3g}"
                  for m in self.matrices]
        return "\n".join(lines)


def masked_layers(model: nn.Module) -> dict[str, MaskedLayer]:
    """All masked layers of ``model`` by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, MaskedLayer)}


def count_base_parameters(model: nn.Module) -> int:
    """Number of model parameters, not counting randmask's own ``values`` (shared ones once).

    A packed 4-bit weight counts its (out x in) entries, so a model and its quantized copy have the same
    count, hence the same budget and the same masks."""
    adapter_params = {id(m.values) for m in model.modules() if isinstance(m, MaskAdapter)}
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen and id(p) not in adapter_params:
            seen.add(id(p))
            total += logical_numel(p)
    return total


def attach_adapter(model: nn.Module, adapter_name: str, config: MaskingConfig, total_params: int,
                   masks: list[tuple[Target, torch.Tensor, list[Block]]], explicit_indices: bool,
                   values: dict[str, torch.Tensor] | None = None, trainable: bool = True) -> None:
    """Freeze ``model``, wrap each target and add adapter ``adapter_name`` with these indices.

    The one attach path of ``apply_masking`` (zero values, trainable) and ``load_adapter``
    (saved ``values`` by module name). Records (config, total_params) for the summary and saving.
    """
    if adapter_name in adapter_names(model):
        raise MaskingError(
            f"adapter {adapter_name!r} is already applied to this model. Call randmask.unload(model) "
            "first, or pass another adapter_name to add a second adapter."
        )
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


def record_adapter(model: nn.Module, adapter_name: str, config: MaskingConfig, total_params: int) -> None:
    """Register adapter ``adapter_name`` (its config and budget denominator) for summaries, saving and switching."""
    model.__dict__.setdefault(_META_ATTR, {})[adapter_name] = {"config": config, "total_params": total_params}
    if _GUARD_ATTR not in model.__dict__:
        model.__dict__[_GUARD_ATTR] = model.register_forward_pre_hook(_refuse_unhonoured_kwargs, with_kwargs=True)


def _refuse_unhonoured_kwargs(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of an adapted model's root: a PEFT-only keyword is an error, not silently dropped."""
    for key in UNHONOURED_FORWARD_KWARGS.keys() & kwargs.keys():
        raise MaskingError(f"{key}= was passed to the forward of a model adapted with randmask.apply_masking / "
                           f"load_adapter, which would ignore it: {UNHONOURED_FORWARD_KWARGS[key]}.")


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
    model.__dict__.pop(_LAYERS_ATTR, None)
    mark_shared_weight(existing, shared_with)  # before any adapter: a tied weight is never written
    layer = MaskedLayer(existing)
    parent_name, _, child = target.name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
    return layer


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the randmask adapters on ``model``."""
    return list(model.__dict__.get(_META_ATTR, {}))


def adapter_meta(model: nn.Module, adapter_name: str) -> dict:
    """{"config": MaskingConfig, "total_params": int} of one adapter; clear error if absent."""
    meta = model.__dict__.get(_META_ATTR, {})
    if adapter_name not in meta:
        raise MaskingError(f"model has no randmask adapter {adapter_name!r}; it has {list(meta)}. "
                           "Apply one with randmask.apply_masking or randmask.load_adapter.")
    return meta[adapter_name]


def masking_summary(model: nn.Module, adapter_name: str = "default") -> MaskingSummary:
    """Per-matrix nnz and the achieved ratio of all base-model parameters."""
    total = adapter_meta(model, adapter_name)["total_params"]
    matrices = []
    for name, layer in masked_layers(model).items():
        if adapter_name not in layer.adapters:
            continue
        in_f = logical_shape(layer.base_layer)[1]
        for block in layer.adapters[adapter_name].blocks:
            label = f"{name}[{block.name}]" if block.name else name
            matrices.append(MatrixBudget(label, (block.stop - block.start, in_f), block.nnz))
    return MaskingSummary(adapter_name, total, matrices)


def print_trainable_parameters(model: nn.Module) -> None:
    """PEFT-style one-liner: trainable params, all params, trainable %."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = count_base_parameters(model)
    print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.6f}")


def set_adapter(model: nn.Module, adapter_name: str) -> None:
    """Make ``adapter_name`` the active adapter of every masked layer (others restored to W0).

    The hot-swap: per layer W0 is written back at the old adapter's entries and W0 + values at the
    new one's, O(nnz) in all: no reload, no dense copy. The layers are found once and cached (the
    cache is dropped whenever randmask wraps or unwraps a layer).
    """
    adapter_meta(model, adapter_name)
    layers = model.__dict__.get(_LAYERS_ATTR)
    if layers is None:  # model traversal costs about as much as the writes of 60 matrices at 1e-3
        layers = model.__dict__[_LAYERS_ATTR] = tuple(masked_layers(model).values())
    for layer in layers:
        layer.set_active(adapter_name if adapter_name in layer.adapters else None)


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove adapter ``adapter_name`` and free its values, indices and layouts, as PEFT's ``delete_adapter``.

    Deleting the active adapter writes W0 back at its entries and makes the first remaining adapter active, with a
    warning (as PEFT does); deleting the last one unwraps every layer, leaving the pristine base model (``unload``).
    Refused inside ``mixed_batch``.
    """
    adapter_meta(model, adapter_name)
    layers = masked_layers(model)
    if any(layer.row_groups is not None for layer in layers.values()):
        raise MaskingError(f"delete_adapter({adapter_name!r}) inside mixed_batch: leave the with-block first.")
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
    del model.__dict__[_META_ATTR][adapter_name]
    if was_active:
        warn_caller(f"adapter {adapter_name!r} was active and is deleted; {remaining[0]!r} is active now "
                    "(call randmask.set_adapter to choose another).", UserWarning)
        set_adapter(model, remaining[0])


@contextlib.contextmanager
def disable_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager: inside it the model computes with the pristine pretrained weights."""
    layers = list(masked_layers(model).values())
    for layer in layers:
        layer.restore_base()
        layer.disabled = True
    try:
        yield model
    finally:
        for layer in layers:
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
    known = model.__dict__.get(_META_ATTR, {})  # (the parameter shadows adapter_names())
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
            for layer in layers:
                layer.row_groups = None
                layer.sync()


def _replace_with_base(model: nn.Module, keep_delta: bool) -> nn.Module:
    if keep_delta:
        check_mergeable(model)
    for name, layer in masked_layers(model).items():
        if keep_delta:
            layer.sync()
        else:
            layer.restore_base()
        mark_shared_weight(layer.base_layer, ())
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.base_layer)
    model.__dict__.pop(_META_ATTR, None)
    model.__dict__.pop(_LAYERS_ATTR, None)
    guard = model.__dict__.pop(_GUARD_ATTR, None)
    if guard is not None:
        guard.remove()
    return model


def check_mergeable(model: nn.Module) -> None:
    """Refuse to merge into a quantized, parametrized or tied weight (before anything is changed): see
    ``merge_and_unload``."""
    for name, layer in masked_layers(model).items():
        if layer.delta_path and layer.active_adapter is not None:
            raise MaskingError(merge_refusal(name, layer.base_layer))


def merge_refusal(name: str, module: nn.Module) -> str:
    """Why a delta is not merged into ``module``'s quantized, parametrized or tied weight, and what to do instead
    (one message for both APIs)."""
    others = weight_shared_with(module)
    if weight_parametrized(module):
        return (f"{name}'s weight is computed by a parametrization (torch.nn.utils.parametrize, e.g. weight_norm) at "
                "every access: a delta merged into it would be lost at the next one. Refused. Keep the adapter "
                "unmerged, or remove the parametrization before masking (parametrize.remove_parametrizations).")
    if others:
        return (f"{name}'s weight is tied to {', '.join(others)}: merging would write the delta into "
                f"{', '.join(others)} too, so the merged model would compute something else than the adapted one. "
                "Refused. Keep the adapter unmerged, or untie before masking (give the module its own copy of the "
                "weight, and set config.tie_word_embeddings=False so that saving keeps it).")
    return (f"{name} is quantized ({quant_scheme(module)}): merging would requantize it: every trained entry "
            "rounded back to the 4/8-bit grid (up to half a grid step of error each) and its block's scale "
            "possibly changed. Refused. Keep the adapter unmerged (the delta path costs one sparse product per "
            "layer), or load the float base, load_adapter(..., verify_base=False) onto it, merge there, and "
            "quantize the merged model.")


def merge_and_unload(model: nn.Module) -> nn.Module:
    """An ordinary model whose weights hold W0 (+) delta of the active adapter; wrappers removed.

    Refused (``MaskingError``, nothing changed) when an adapted weight is quantized, parametrized or tied: see
    ``merge_refusal``."""
    return _replace_with_base(model, keep_delta=True)


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter and restore the pretrained weights bit for bit."""
    return _replace_with_base(model, keep_delta=False)
