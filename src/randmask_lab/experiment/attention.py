"""A CPU attention kernel for bf16 runs: grouped-query heads folded into the query length.

Measured on this machine (2 threads, SmolLM2-135M shapes: batch 8, 9 query / 3 key-value heads,
184 tokens, head dim 64; one layer, forward + backward, see benchmarks/precision_step.py):

    fp32, PyTorch's default SDPA (flash)           ~22 ms
    bf16, default SDPA (flash)                     ~34 ms   (its bf16 backward is slow on CPU)
    bf16, SDPA math backend (+ repeat_kv)          ~25 ms
    bf16, this kernel                              ~11 ms

Two things make the difference. (1) Grouped-query attention needs no ``repeat_kv`` copy of the keys
and values (nor the gradient sum that undoes it): the ``G`` query heads that share a key-value head
are stacked along the query axis, so one (G*T, D) x (D, S) product per key-value head replaces G
small ones, which also suits the bf16 matrix units better. (2) The softmax runs in fp32 (as HF's
eager attention does): PyTorch's bf16 softmax kernels on CPU are slower than its fp32 ones.

It is registered with transformers' ``AttentionInterface`` under ``ATTENTION_NAME`` and takes the
same masks as ``sdpa`` (``AttentionMaskInterface``). Anything it does not cover (logit soft-capping,
attention sinks, position biases, a cropped static cache, other dtypes or devices) goes to
transformers' own ``sdpa_attention_forward`` unchanged.
"""

from __future__ import annotations

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
    # Query heads h = j*G + g share key-value head j (repeat_kv's order): stack them along the query axis.
    q = (query * scale).reshape(batch, n_kv, groups * q_len, dim)  # (B, Hkv, G*Tq, D)
    scores = torch.matmul(q, key.transpose(-1, -2))  # (B, Hkv, G*Tq, S)
    scores = scores.float() if scores.dtype in (torch.bfloat16, torch.float16) else scores  # fp32 softmax
    scores = scores.view(batch, n_kv, groups, q_len, kv_len)
    if attention_mask is None and causal:
        # Bottom-right aligned: the last query sees every key (a query over a longer cache).
        attention_mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
    if attention_mask is not None:
        mask = attention_mask[..., :kv_len]  # (Tq, S), or (B|1, 1|Hq, Tq, S)
        if mask.dim() == 4 and mask.shape[1] == 1:
            mask = mask.unsqueeze(2)  # (B|1, 1, 1, Tq, S): the same for every head
        elif mask.dim() == 4:
            mask = mask.reshape(mask.shape[0], n_kv, groups, q_len, kv_len)  # per query head
        if mask.dtype == torch.bool:
            # finfo.min, not -inf: a fully masked row (left padding) gets a uniform softmax, not NaN.
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask.to(scores.dtype)
    probs = torch.softmax(scores, dim=-1).to(value.dtype).view(batch, n_kv, groups * q_len, kv_len)
    if dropout > 0.0:
        probs = F.dropout(probs, p=dropout, training=True)
    out = torch.matmul(probs, value)  # (B, Hkv, G*Tq, D)
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
