"""Quantized base weights: recognise them, read W0 at the kept entries, size and count them.

A bitsandbytes 4-bit (NF4/FP4) or 8-bit (LLM.int8) ``Linear``, or an ``nn.Linear`` whose weight is a
torchao tensor subclass (``quantize_(model, Int8WeightOnlyConfig())`` and friends), stores W packed in
4 or 8 bits: it cannot hold ``W0 + values`` at the kept entries. A masked layer over such a weight
takes the delta path (``randmask.delta``): ``y = base(x) + sparse_delta(x, values, pattern)``, and the
stored weight is never written to, copied or dequantized for training.

The backends are recognised by their tensor types, never imported here (``import randmask`` stays
torch + safetensors); bitsandbytes' own dequantization is imported only when one of its weights is
already in the model. W0 at the kept entries (for the base fingerprint; a quantized layer holds none) is read
from one matrix dequantized at a time, then freed.
"""

from __future__ import annotations

import torch
from torch import nn

from randmask.config import MaskingError
from randmask.sharding import full_tensor, is_sharded


def quant_scheme(module: nn.Module) -> str | None:
    """``"bnb-nf4"``, ``"bnb-fp4"``, ``"bnb-int8"``, ``"torchao-<TensorType>"``, or None for a float weight."""
    weight = getattr(module, "weight", None)
    if weight is None:
        return None
    cls = type(weight)
    if cls is nn.Parameter or cls is torch.Tensor:  # the common float weight, answered before any string test
        return None
    if is_sharded(weight):  # FSDP2 between forwards: a DTensor over this rank's shard, quantized or not
        weight = weight._local_tensor  # not to_local(): no autograd node, and no dispatch through the subclass
        cls = type(weight)
    origin = cls.__module__
    if origin.startswith("bitsandbytes"):
        if _is_bnb_4bit(weight):
            if not getattr(weight, "bnb_quantized", False) or weight.quant_state is None:
                raise MaskingError(f"{type(module).__name__}'s 4-bit weight is not quantized yet (bitsandbytes "
                                   "quantizes it when the model moves to its device): move the model to its "
                                   "device, or load it with quantization_config=, before applying randmask.")
            return f"bnb-{weight.quant_type}"
        if cls.__name__ == "Int8Params" and weight.dtype == torch.int8:
            return "bnb-int8"
        return None  # e.g. Int8Params with has_fp16_weights=True: a float weight, trained in place
    if origin.startswith("torchao") and callable(getattr(cls, "dequantize", None)):  # on the class: Dynamo traces it
        return f"torchao-{cls.__name__}"
    return None


def disable_bnb_cpu_repacking(model: nn.Module) -> int:
    """Keep every bitsandbytes 4-bit weight of ``model`` in its standard packing; return how many layers it set.

    On a CPU with AVX512-bf16, bitsandbytes (0.50) repacks a ``Linear4bit`` weight in place for its fused
    kernel at the layer's first eval-mode forward without gradients. Measured on such a CPU: after that,
    ``dequantize_4bit`` reads wrong values (off by up to 0.18 on a 128x128 NF4 layer) and a training
    forward through the layer carries no gradient to its input, so every layer below it would train on a
    wrong gradient, silently. Its inverse is best-effort (the scales stay rounded to bf16). randmask reads
    W0 and trains through frozen 4-bit layers, so it turns the repacking off for every such layer of the
    model (the layers then compute as they do on any other CPU), and refuses a weight already repacked.
    """
    changed = 0
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not _is_bnb_4bit(weight):
            continue
        _check_standard_packing(name, weight)
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def _is_bnb_4bit(weight: object) -> bool:
    """Whether ``weight`` is a bitsandbytes ``Params4bit`` (recognised by type, without importing bitsandbytes)."""
    return type(weight).__name__ == "Params4bit" and type(weight).__module__.startswith("bitsandbytes")


def _check_standard_packing(name: str, weight: torch.Tensor) -> None:
    if getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False):
        raise MaskingError(f"{name or 'the layer'}: its 4-bit weight was repacked in place by bitsandbytes' "
                           "AVX512-bf16 CPU inference path (an eval forward without gradients), which rounds its "
                           "scales to bf16 and passes no gradient through the layer. Reload the model and apply "
                           "randmask before its first eval forward (randmask then keeps the standard packing).")


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module``'s weight is stored quantized (the masked layer then takes the delta path)."""
    return quant_scheme(module) is not None


def check_weight(name: str, module: nn.Module) -> None:
    """A ``MaskingError`` for a weight randmask can neither train in place nor read (unknown quantization), or one
    sharded already."""
    weight = module.weight
    if is_sharded(weight):  # FSDP2 manages the parameters it found at fully_shard, and only those
        raise MaskingError(f"{name}: its weight is sharded already (FSDP2's fully_shard, or tensor parallel). Apply "
                           "randmask (apply_masking, load_adapter, get_peft_model) before sharding, so that FSDP2 "
                           "shards the trainable values too and averages their gradients over the ranks; added "
                           "after, each rank would train its own copy.")
    if is_quantized(module) or weight.is_floating_point():
        return
    raise MaskingError(f"{name}: its weight is {weight.dtype} ({type(weight).__module__}.{type(weight).__name__}); "
                       "randmask trains float weights in place and reads bitsandbytes (4-bit, 8-bit) and torchao "
                       "quantized weights. Dequantize this layer or quantize it with one of those.")


def stored_shape(module: nn.Module) -> tuple[int, int]:
    """The stored weight's 2-D shape: ``weight.shape``, or (out, in) for a packed quantized weight."""
    weight = module.weight
    if is_quantized(module):
        state = getattr(weight, "quant_state", None)
        if state is not None:  # bnb 4-bit: weight.shape is the packed (n/2, 1) byte column
            return tuple(state.shape)  # type: ignore[return-value]
        return (module.out_features, module.in_features) if isinstance(module, nn.Linear) else tuple(weight.shape)
    return tuple(weight.shape)  # type: ignore[return-value]


def logical_numel(param: torch.Tensor) -> int:
    """Parameters a tensor stands for: a packed 4-bit weight counts its (out x in) entries, not its bytes."""
    state = getattr(param, "quant_state", None)
    if type(param).__name__ == "Params4bit" and state is not None:
        return int(torch.Size(state.shape).numel())
    return param.numel()


def dequantized(module: nn.Module) -> torch.Tensor:
    """The whole stored weight in float, (out, in): a transient copy (only for reading W0 or merging). A sharded
    (FSDP2) weight is gathered first: a collective, which every rank of its mesh must call."""
    weight = module.weight
    scheme = quant_scheme(module)
    if is_sharded(weight):
        weight = full_tensor(weight.detach())
    if scheme is None:
        return weight.detach()
    if scheme.startswith("bnb-"):
        import bitsandbytes.functional as bnbf  # present: one of its weights is in the model

        if scheme == "bnb-int8":
            return bnbf.int8_vectorwise_dequant(weight.data, _int8_row_scales(module))  # (out, in) fp32
        _check_standard_packing("", weight)  # a repacked weight would dequantize to wrong values
        return bnbf.dequantize_4bit(weight.data, weight.quant_state)  # (out, in), quant_state.dtype
    with torch.no_grad():
        original = getattr(weight, "get_original_weight", None)  # torchao's NF4Tensor (torchtune's QLoRA base)
        return original() if callable(original) else weight.dequantize()


def _int8_row_scales(module: nn.Module) -> torch.Tensor:
    # Linear8bitLt moves the row scales from the weight (SCB) to its matmul state at its first forward.
    scb = getattr(module.weight, "SCB", None)
    return scb if scb is not None else module.state.SCB


def base_entries(module: nn.Module, indices: torch.Tensor) -> torch.Tensor:
    """W0 at flat stored-weight ``indices`` of a Linear/Conv1D that holds no adapter's delta there, as the layer
    computes with it: dequantized for a quantized weight; a sharded one is gathered first (a collective)."""
    weight = module.weight
    if not is_quantized(module) and not is_sharded(weight):
        return weight.detach().reshape(-1).index_select(0, indices.to(weight.device))  # a copy: one gather
    with torch.no_grad():
        dense = dequantized(module)
        entries = dense.reshape(-1)[indices.to(dense.device)].clone()
        del dense
    return entries


def layer_bytes(module: nn.Module) -> int:
    """Bytes of every tensor a module holds (parameters, buffers, bitsandbytes quantization state,
    torchao inner tensors), each storage once: what keeping this layer costs."""
    seen: set[tuple[int, int]] = set()
    total = 0

    def add(t: torch.Tensor | None) -> None:
        nonlocal total
        if t is None or not isinstance(t, torch.Tensor):
            return
        inner = getattr(t, "__tensor_flatten__", None)
        if inner is not None and type(t) not in (torch.Tensor, nn.Parameter):
            for name in inner()[0]:  # torchao subclass: qdata, scale, zero_point, ...
                add(getattr(t, name))
            return
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()

    for t in [*module.parameters(), *module.buffers()]:
        add(t)
        state = getattr(t, "quant_state", None)
        if state is not None:  # bnb 4-bit: absmax (and the nested state's, when double-quantized)
            for attr in ("absmax", "code", "offset"):
                add(getattr(state, attr, None))
            nested = getattr(state, "state2", None)
            if nested is not None:
                add(nested.absmax)
                add(nested.code)
        add(getattr(t, "SCB", None))  # bnb int8 row scales (moved to module.state at the first forward)
        add(getattr(t, "CB", None))
    for sub in module.modules():
        state = getattr(sub, "state", None)
        if state is not None and type(state).__module__.startswith("bitsandbytes"):
            add(getattr(state, "SCB", None))
            add(getattr(state, "CB", None))
    return total


__all__ = ["base_entries", "check_weight", "dequantized", "disable_bnb_cpu_repacking", "is_quantized", "layer_bytes",
           "logical_numel", "quant_scheme", "stored_shape"]
