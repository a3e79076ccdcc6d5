"""The per-architecture target tables (keyed by ``model.config.model_type``): which modules are q/v, every
attention projection, every MLP projection, and the two output projections Houlsby adapters sit after. Data only:
``randmask.targets`` resolves them against a model."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ArchitectureTargets:
    """Target specs of one architecture (keyed by ``model.config.model_type``).

    Each field is a tuple of alternatives: the first whose items all exist in the model is used
    (transformers renamed some projections between versions).
    """

    qv: tuple[tuple[str, ...], ...]  # attention query and value: the paper's (and LoRA's) default
    attention: tuple[tuple[str, ...], ...]  # every attention projection
    mlp: tuple[tuple[str, ...], ...]  # every MLP projection
    attention_out: tuple[tuple[str, ...], ...]  # attention output projection (Houlsby adapter 1)
    mlp_out: tuple[tuple[str, ...], ...]  # MLP output projection (Houlsby adapter 2)


TARGET_SETS: tuple[str, ...] = ("qv", "attention", "mlp", "all_linear", "attention_out", "mlp_out")
"""Names accepted by ``default_targets(model, which)``; ``all_linear`` is attention + mlp."""

_LLAMA = ArchitectureTargets(
    qv=(("q_proj", "v_proj"),),
    attention=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),),
    mlp=(("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),),
    attention_out=(("self_attn.o_proj",),),
    mlp_out=(("mlp.down_proj",),),
)
_OPT_LIKE = ArchitectureTargets(  # OPT and CLIP: out_proj and fc1/fc2
    qv=(("q_proj", "v_proj"),),
    attention=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"),),
    mlp=(("fc1", "fc2"),),
    attention_out=(("self_attn.out_proj",),),
    mlp_out=(("fc2",),),
)
# BERT-style encoders; transformers >= 5 renamed some of them to q_proj/.../o_proj and mlp.fc1/fc2.
_BERT = ArchitectureTargets(
    qv=(("query", "value"), ("q_proj", "v_proj")),
    attention=(("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"),
               ("attention.attention.query", "attention.attention.key", "attention.attention.value",
                "attention.output.dense"),
               ("q_proj", "k_proj", "v_proj", "o_proj")),
    mlp=(("intermediate.dense", "layer.*.output.dense"), ("mlp.fc1", "mlp.fc2")),
    attention_out=(("attention.output.dense",), ("o_proj",)),
    mlp_out=(("layer.*.output.dense",), ("mlp.fc2",)),
)

ARCHITECTURES: dict[str, ArchitectureTargets] = {
    "opt": _OPT_LIKE,
    "llama": _LLAMA,  # SmolLM2 is a Llama
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "gemma": _LLAMA,
    "gemma2": _LLAMA,
    "gemma3": _LLAMA,
    "gemma3_text": _LLAMA,
    # GPT-2 fuses q, k, v in one Conv1D whose output columns are [q | k | v]: q/v means its
    # q and v blocks, for every method.
    "gpt2": ArchitectureTargets(
        qv=(("c_attn[q,v]",),),
        attention=(("attn.c_attn", "attn.c_proj"),),
        mlp=(("mlp.c_fc", "mlp.c_proj"),),
        attention_out=(("attn.c_proj",),),
        mlp_out=(("mlp.c_proj",),),
    ),
    "bert": _BERT,
    "roberta": _BERT,
    "vit": _BERT,
    "clip": _OPT_LIKE,
    "clip_vision_model": _OPT_LIKE,
    "clip_text_model": _OPT_LIKE,
}


def model_type_of(model: nn.Module) -> str | None:
    """``model.config.model_type``, or None for a plain ``nn.Module``."""
    return getattr(getattr(model, "config", None), "model_type", None)


__all__ = ["ARCHITECTURES", "TARGET_SETS", "ArchitectureTargets", "model_type_of"]
