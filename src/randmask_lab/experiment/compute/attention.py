"""A CPU attention kernel for bf16 runs: grouped-query heads folded into the query length.

Measured on this machine (``python benchmarks/attention_kernels.py``: 2 threads, SmolLM2-135M shapes:
batch 8, 9 query / 3 key-value heads, 184 tokens, head dim 64, padding + causal mask; one layer,
forward + backward, median of 20 interleaved rounds):

    fp32, PyTorch's default SDPA                   25.1 ms
    bf16, default SDPA (flash)                     36.7 ms   (its bf16 backward is slow on CPU)
    bf16, SDPA math backend (+ repeat_kv)          35.2 ms
    bf16, this kernel                              14.5 ms

Three things make the difference. (1) Grouped-query attention needs no ``repeat_kv`` copy of the
keys and values (nor the gradient sum that undoes it): the ``G`` query heads that share a key-value
head are stacked along the query axis, so one (G*T, D) x (D, S) product per key-value head replaces
G small ones, which also suits the bf16 matrix units better. (2) The scale and the mask go into the
first GEMM (``baddbmm`` with an additive bias built once per mask and shared by every layer), so
there is no masked_fill or scaling pass over the (G*T, S) scores, nor SDPA math's fully-masked-row
checks. (3) The softmax stays in bf16 (PyTorch's CPU kernel computes it in fp32 internally).

It is registered with transformers' ``AttentionInterface`` under ``ATTENTION_NAME`` and takes the
same masks as ``sdpa`` (``AttentionMaskInterface``). Anything it does not cover (logit soft-capping,
attention sinks, position biases, a cropped static cache, other dtypes or devices) goes to
transformers' own ``sdpa_attention_forward`` unchanged.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION_NAME = "randmask_cpu_bf16"
_UNSUPPORTED = ("softcap", "s_aux", "position_bias", "sinks")


def folded_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function: (B, Hq, Tq, D) query, (B, Hkv, S, D) key/value -> (B, Tq, Hq, D)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    n_q, q_len = query.shape[1], query.shape[2]
    n_kv, kv_len = key.shape[1], key.shape[2]
    causal = (is_causal if is_causal is not None else getattr(module, "is_causal", True)) and q_len > 1
    bf16 = query.dtype == torch.bfloat16 or (  # bf16-mixed: rotary embeddings can hand over fp32 q and k
        torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
    if (query.device.type != "cpu" or not bf16 or n_q % n_kv
            or any(kwargs.get(k) is not None for k in _UNSUPPORTED) or kwargs.get("output_attentions")
            or (attention_mask is None and causal and q_len != kv_len)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    out = folded(query, key, value, attention_mask, causal, scaling, dropout)
    return out.transpose(1, 2).contiguous(), None


class _LastBias(threading.local):
    """The additive bias built from the last mask: transformers hands every layer the same mask tensor."""

    source: weakref.ref | None = None
    key: tuple = ()
    bias: torch.Tensor | None = None


_LAST_BIAS = _LastBias()


def additive_bias(mask: torch.Tensor, batch: int, n_kv: int, groups: int, q_len: int, kv_len: int,
                  dtype: torch.dtype) -> torch.Tensor:
    """(B*Hkv, G*Tq, S) additive bias of a bool (True = attend) or float mask of shape (Tq, S) or
    (B|1, 1|Hq, Tq, S), laid out like the folded scores; built once per mask tensor, reused by every layer."""
    key = (mask._version, batch, n_kv, groups, q_len, kv_len, dtype)
    last = _LAST_BIAS
    if last.source is not None and last.source() is mask and last.key == key and last.bias is not None:
        return last.bias
    m = mask[..., :kv_len]
    if m.dim() == 4 and m.shape[1] == 1:
        m = m.unsqueeze(2)  # (B|1, 1, 1, Tq, S): the same for every head
    elif m.dim() == 4:
        m = m.reshape(m.shape[0], n_kv, groups, q_len, kv_len)  # per query head
    m = m.expand(batch, n_kv, groups, q_len, kv_len)
    if m.dtype == torch.bool:
        # finfo.min, not -inf: a fully masked row (left padding) gets a uniform softmax, not NaN.
        bias = torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill_(~m, torch.finfo(dtype).min)
    else:
        bias = m.to(dtype).clamp(min=torch.finfo(dtype).min)
    bias = bias.reshape(batch * n_kv, groups * q_len, kv_len)
    last.source, last.key, last.bias = weakref.ref(mask), key, bias
    return bias


def causal_bias(groups: int, q_len: int, kv_len: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(G*Tq, S) additive causal bias, bottom-right aligned (the last query sees every key, as over a longer
    cache); it broadcasts over (B*Hkv). Built once per shape, reused by every layer: without padding,
    transformers hands the layers no mask at all."""
    key = ("causal", groups, q_len, kv_len, dtype, device)
    last = _LAST_BIAS
    if last.key == key and last.bias is not None:
        return last.bias
    keep = torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(kv_len - q_len)
    bias = torch.zeros((q_len, kv_len), dtype=dtype, device=device).masked_fill_(~keep, torch.finfo(dtype).min)
    last.source, last.key, last.bias = None, key, bias.repeat(groups, 1)
    return last.bias


def folded(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
           causal: bool, scaling: float | None = None, dropout: float = 0.0) -> torch.Tensor:
    """Attention of (B, Hq, Tq, D) queries over (B, Hkv, S, D) keys/values -> (B, Hq, Tq, D), any dtype.

    ``attention_mask``: None, or bool (True = attend) / additive float, of shape (Tq, S) or
    (B|1, 1|Hq, Tq, S). ``causal`` (bottom-right aligned) applies when there is no mask.
    """
    batch, n_q, q_len, dim = query.shape
    n_kv, kv_len = key.shape[1], key.shape[2]
    groups = n_q // n_kv
    scale = scaling if scaling is not None else dim ** -0.5
    device = query.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else query.dtype
    # Query heads h = j*G + g share key-value head j (repeat_kv's order): stack them along the query axis.
    q = query.reshape(batch * n_kv, groups * q_len, dim)  # (B*Hkv, G*Tq, D)
    k_t = key.reshape(batch * n_kv, kv_len, dim).transpose(1, 2)  # (B*Hkv, D, S)
    bias = (additive_bias(attention_mask, batch, n_kv, groups, q_len, kv_len, dtype) if attention_mask is not None
            else causal_bias(groups, q_len, kv_len, dtype, query.device) if causal else None)
    # Scale and mask inside the GEMM: no separate passes over the (B*Hkv, G*Tq, S) scores.
    scores = torch.bmm(q, k_t).mul_(scale) if bias is None else torch.baddbmm(bias, q, k_t, alpha=scale)
    # Softmax in the scores' dtype: PyTorch's CPU kernel computes a bf16 softmax in fp32 and rounds only
    # its output (within 6e-5 of an fp32 softmax rounded to bf16), and it is ~1.5x faster than that.
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    if dropout > 0.0:
        probs = F.dropout(probs, p=dropout, training=True)
    out = torch.matmul(probs, value.reshape(batch * n_kv, kv_len, dim))  # (B*Hkv, G*Tq, D)
    return out.view(batch, n_q, q_len, dim)


def register() -> None:
    """Register ``folded_attention`` (and sdpa's mask builder) with transformers, once."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    if ATTENTION_NAME not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionInterface.register(ATTENTION_NAME, folded_attention)
        AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def use_folded_attention(model: nn.Module) -> bool:
    """Switch a transformers model that runs ``sdpa`` attention to ``folded_attention``; False (model
    unchanged) when it runs another implementation or cannot switch."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa" \
            or not hasattr(model, "set_attn_implementation"):
        return False
    register()
    try:
        model.set_attn_implementation(ATTENTION_NAME)
    except (ValueError, ImportError):
        return False
    return getattr(model.config, "_attn_implementation", None) == ATTENTION_NAME
