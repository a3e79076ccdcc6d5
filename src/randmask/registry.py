"""Which randmask adapters a model carries: the registry kept on the model object, the cached list of its masked
layers, and the forward guard that refuses PEFT-only keywords. Every API that adds, lists or removes adapters goes
through these names."""

from __future__ import annotations

from torch import nn

from randmask.config import MaskingConfig, MaskingError
from randmask.layer import MaskedLayer

_META_ATTR = "randmask_adapters"  # {adapter name: {"config": MaskingConfig, "total_params": int}}
_LAYERS_ATTR = "randmask_layers"  # the masked layers, cached for set_adapter; dropped whenever one is added/removed
_DISABLED_ATTR = "randmask_disabled_depth"  # how many disable_adapter blocks the model is inside (absent: none)
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


def masked_layers(model: nn.Module) -> dict[str, MaskedLayer]:
    """All masked layers of ``model`` by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, MaskedLayer)}



def cached_layers(model: nn.Module) -> tuple[MaskedLayer, ...]:
    """The masked layers of ``model``, found once and cached until ``forget_layers`` (set_adapter's hot path: the
    model traversal costs about as much as the writes of 60 matrices at 1e-3)."""
    layers = model.__dict__.get(_LAYERS_ATTR)
    if layers is None:
        layers = model.__dict__[_LAYERS_ATTR] = tuple(masked_layers(model).values())
    return layers


def forget_layers(model: nn.Module) -> None:
    """Drop the cached layer list: call whenever a layer is wrapped or unwrapped."""
    model.__dict__.pop(_LAYERS_ATTR, None)


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


def disabled_depth(model: nn.Module) -> int:
    """How many ``disable_adapter`` blocks ``model`` is inside: a layer wrapped inside one starts disabled."""
    return model.__dict__.get(_DISABLED_ATTR, 0)


def set_disabled_depth(model: nn.Module, depth: int) -> None:
    if depth:
        model.__dict__[_DISABLED_ATTR] = depth
    else:
        model.__dict__.pop(_DISABLED_ATTR, None)


def refuse_in_mixed_batch(model: nn.Module, what: str) -> None:
    """MaskingError when ``model`` is inside ``mixed_batch``, whose per-sample tables hold the adapters it began
    with: ``what`` (adding or removing adapters, unloading) must wait until the with-block ends."""
    if any(layer.row_groups is not None for layer in masked_layers(model).values()):
        raise MaskingError(f"{what} inside mixed_batch: leave the with-block first.")


def forget_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove one adapter from the registry (its layers' tensors are the caller's to drop)."""
    del model.__dict__[_META_ATTR][adapter_name]


def forget_all(model: nn.Module) -> None:
    """Forget every adapter, the layer cache and the forward guard: the model is an ordinary one again."""
    model.__dict__.pop(_META_ATTR, None)
    model.__dict__.pop(_DISABLED_ATTR, None)
    forget_layers(model)
    guard = model.__dict__.pop(_GUARD_ATTR, None)
    if guard is not None:
        guard.remove()


__all__ = ["UNHONOURED_FORWARD_KWARGS", "adapter_meta", "adapter_names", "cached_layers", "disabled_depth",
           "forget_adapter", "forget_all", "forget_layers", "masked_layers", "record_adapter", "refuse_in_mixed_batch",
           "set_disabled_depth"]
