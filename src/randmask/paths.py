"""Which path a masked layer takes: the delta written into the weight (in place), or added beside it.

Beside (``y = base(x) + sparse_delta(x)``, ``randmask.delta``) when the weight cannot hold the trained entries
(quantized: packed 4/8-bit), would lose them (parametrized: ``weight_norm`` recomputes it at every access), or must
not hold them (tied: the same ``Parameter`` is another module's too, e.g. the input embedding under
``tie_word_embeddings``, which a write would change as well). Ties are found on the model (``randmask.targets
.weight_ties``) and recorded on the wrapped module before its first adapter; the rest is read off the module.
Under a ``torch.func`` transform (``func_transform_active``) an in-place layer writes nothing either: it adds the
delta from what the weight holds to W0 + values beside it, in plain differentiable ops.
"""

from __future__ import annotations

import torch
from torch import nn

from randmask.config import MaskingError
from randmask.quantized import is_quantized

_SHARED_WEIGHT_ATTR = "_randmask_weight_shared_with"


def check_weight_assignment(layer: nn.Module, name: str, value: object) -> bool:
    """Whether ``layer.name = value`` on a masked layer (randmask's or PEFT's) is a no-op; MaskingError if it would
    replace the weight. transformers' ``tie_weights`` (called by ``resize_token_embeddings``, accelerate's FSDP
    preparation, Trainer's resume) assigns the embedding's weight to ``lm_head.weight``: the same tensor when it is
    tied already (a no-op), a new one after a resize, whose entries the adapter's indices no longer address."""
    if name not in ("weight", "bias") or "base_layer" not in layer._modules:
        return False
    if value is getattr(layer._modules["base_layer"], name, None):
        return True
    raise MaskingError(f"the {name} of masked layer {type(layer._modules['base_layer']).__name__} cannot be replaced "
                       "(transformers' tie_weights and resize_token_embeddings do that): the adapter's entries index "
                       "the current one. Resize or tie before masking, or unload the adapter first.")


def func_transform_active() -> bool:
    """Whether a ``torch.func`` transform (grad, vjp, jvp, vmap) runs this call, eagerly: it refuses an in-place write
    into a tensor the function captured (the weight), and the fused ops' autograd Functions."""
    return not torch.compiler.is_compiling() and torch._C._functorch.peek_interpreter_stack() is not None


def mark_shared_weight(module: nn.Module, others: tuple[str, ...]) -> None:
    """Record (``others``: the modules that also hold ``module``'s weight) or clear (``()``) a tied weight. Set
    before the first adapter is added: it decides the layer's path (``uses_delta_path``)."""
    if others:
        module.__dict__[_SHARED_WEIGHT_ATTR] = tuple(others)
    else:
        module.__dict__.pop(_SHARED_WEIGHT_ATTR, None)


def weight_shared_with(module: nn.Module) -> tuple[str, ...]:
    """The modules recorded by ``mark_shared_weight`` as holding ``module``'s weight too (``()``: none)."""
    return module.__dict__.get(_SHARED_WEIGHT_ATTR, ())  # not getattr: nn.Module's miss raises, once per forward


def weight_parametrized(module: nn.Module) -> bool:
    """Whether ``module.weight`` is computed by a ``torch.nn.utils.parametrize`` parametrization (``weight_norm``,
    ``spectral_norm``, ``orthogonal``) at every access: a write into it would never reach the forward."""
    parametrizations = module._modules.get("parametrizations")
    return parametrizations is not None and "weight" in parametrizations


def uses_delta_path(module: nn.Module) -> bool:
    """Whether a masked layer over ``module`` adds its delta beside the weight (True: the weight is quantized and
    cannot hold the trained entries, tied to another module, which a write would change too, or parametrized,
    recomputed at every access) or writes it into the weight (False)."""
    if is_quantized(module) or weight_shared_with(module) or weight_parametrized(module):
        return True
    dtype = module.weight.dtype
    if not dtype.is_floating_point:  # neither path: check_weight refused this at attach, so it changed since
        raise MaskingError(f"{type(module).__name__}'s weight is now a plain {dtype} tensor, which randmask can "
                           "neither write into nor add a delta beside: a quantized weight lost its type (FSDP2's "
                           "fully_shard does that to bitsandbytes' Params4bit and Int8Params). Shard a float base, or "
                           "a torchao NF4Tensor one (NF4WeightOnlyConfig, as torchtune's QLoRA-FSDP2 does).")
    return False


__all__ = ["check_weight_assignment", "func_transform_active", "mark_shared_weight", "uses_delta_path",
           "weight_parametrized", "weight_shared_with"]
