"""Turning a masked model back into an ordinary one: ``merge_and_unload`` (W0 (+) the active adapter's delta) and
``unload`` (W0 bit for bit), and why a quantized, parametrized or tied weight is never merged into."""

from __future__ import annotations

from torch import nn

from randmask.config import MaskingError
from randmask.paths import mark_shared_weight, weight_parametrized, weight_shared_with
from randmask.quantized import quant_scheme
from randmask.registry import forget_all, masked_layers


def _replace_with_base(model: nn.Module, keep_delta: bool) -> nn.Module:
    if keep_delta:
        check_mergeable(model)
    for name, layer in masked_layers(model).items():
        # Inside disable_adapter or mixed_batch the weight holds W0: enabled again, so that the delta is written
        # now (the block's end no longer sees an unwrapped layer)
        layer.disabled, layer.row_groups = False, None
        if keep_delta:
            layer.sync()
        else:
            layer.restore_base()
        mark_shared_weight(layer.base_layer, ())
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.base_layer)
    forget_all(model)
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


__all__ = ["check_mergeable", "merge_and_unload", "merge_refusal", "unload"]
