"""Prefix tuning (Li & Liang, 2021) via peft: 5 virtual tokens of trainable keys and values.

As in the paper (appendix B.1), the prefix of a causal LM starts from the keys and values
("activations") the frozen model computes for random real tokens (drawn with `seed`);
`init="random"` keeps peft's N(0, 1) initialisation instead. Causal LMs only: peft 0.21's
sequence-classification path looks for a `past_key_values` forward argument, which
transformers 5 renamed to `cache` (its causal-LM path still works through a deprecation shim
that transformers says goes in 5.40).
"""

from __future__ import annotations

import torch
from torch import nn

from randmask_lab.methods.common import (
    check_size_option,
    fix_peft_heads,
    peft_saver,
    peft_task_type,
    seeded,
)
from randmask_lab.methods.prepared import PreparedModel, build_report


def prepare_prefix(
    model: nn.Module,
    *,
    total: int,
    heads: list[str],
    seed: int = 0,
    num_virtual_tokens: int = 5,
    init: str = "real",
) -> PreparedModel:
    """Wrap causal LM `model` with a peft prefix of `num_virtual_tokens` keys/values per layer."""
    from peft import PrefixTuningConfig, get_peft_model

    task = peft_task_type(model)
    if task != "CAUSAL_LM":
        raise ValueError(
            f"prefix tuning is supported for causal LMs (the paper's setting), got {type(model).__name__}: "
            "peft 0.21 prefix-tunes sequence classifiers only through a forward argument "
            "`past_key_values`, which transformers 5 renamed to `cache`. Load an *ForCausalLM model"
        )
    positions = getattr(model.config.get_text_config(), "max_position_embeddings", None) or 4096
    check_size_option("prefix", "num_virtual_tokens", num_virtual_tokens, positions,
                      "the prefix and the prompt must fit the model's positions")
    if init not in ("real", "random"):
        raise ValueError(f"prefix init must be 'real' or 'random', got {init!r}")
    prefix = _real_activations(model, num_virtual_tokens, seed) if init == "real" else None
    config = PrefixTuningConfig(
        num_virtual_tokens=num_virtual_tokens, task_type=task, modules_to_save=list(heads) or None
    )
    with seeded(seed):
        wrapped = get_peft_model(model, config)
    fix_peft_heads(wrapped, heads)
    notes = [f"{num_virtual_tokens} virtual tokens, init={init}"]
    if prefix is not None:
        weight = wrapped.prompt_encoder["default"].embedding.weight
        if prefix.shape != weight.shape:
            raise RuntimeError(
                f"real-activation prefix has shape {tuple(prefix.shape)} but peft expects "
                f"{tuple(weight.shape)} for {type(model).__name__}; use init='random'"
            )
        with torch.no_grad():
            weight.copy_(prefix.to(weight.dtype))
    report = build_report("prefix", wrapped, total, heads, notes=notes)
    return PreparedModel(wrapped, report, save_native=peft_saver(wrapped))


def _real_activations(model: nn.Module, n_tokens: int, seed: int) -> torch.Tensor:
    """Keys/values of `n_tokens` random tokens, laid out as peft's prefix embedding rows.

    Row t is (layer, key|value, head, head_dim) flattened, matching peft's
    ``view(B, T, L * 2, H, D).permute(2, 0, 3, 1, 4)`` in `PeftModel.get_prompt`.
    """
    vocab = model.config.get_text_config().vocab_size
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    tokens = torch.randint(0, vocab, (1, n_tokens), generator=generator).to(device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        cache = model(input_ids=tokens, use_cache=True).past_key_values
    model.train(was_training)
    if cache is None:
        raise ValueError(f"{type(model).__name__} returned no key/value cache; use init='random'")
    rows = []
    for key, value in _layers(cache):  # each (1, H, T, D)
        rows.append(torch.stack([key[0], value[0]]).permute(2, 0, 1, 3))  # (T, 2, H, D)
    return torch.cat(rows, dim=1).reshape(n_tokens, -1)  # (T, L * 2 * H * D)


def _layers(cache: object) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(key, value) per layer from a transformers Cache (v5 `.layers`) or a legacy tuple."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return [(k, v) for k, v in cache]
