"""Where the q/v, attention, MLP and output projections are, per architecture.

Patterns are regular-expression fragments matched at the end of a dotted module name
(``q_proj`` matches ``model.layers.0.self_attn.q_proj``; ``layer\\.\\d+\\.output\\.dense`` matches
BERT's MLP output but not ``attention.output.dense``). A tuple may list alternatives for
several transformers versions: only those present in the model are used.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ArchTargets:
    """Module-name patterns for one architecture (keyed by `model.config.model_type`)."""

    qv: tuple[str, ...]  # query and value projections: LoRA, AdaLoRA, masking (plain leaf names)
    attention: tuple[str, ...]  # every attention projection: BitFit
    mlp: tuple[str, ...]  # every MLP projection: BitFit
    attention_out: tuple[str, ...]  # attention output projection: adapter 1
    mlp_out: tuple[str, ...]  # MLP output projection: adapter 2


_LLAMA = ArchTargets(
    qv=("q_proj", "v_proj"),
    attention=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
    mlp=("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    attention_out=("self_attn.o_proj",),
    mlp_out=("mlp.down_proj",),
)
_CLIP = ArchTargets(
    qv=("q_proj", "v_proj"),
    attention=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"),
    mlp=("mlp.fc1", "mlp.fc2"),
    attention_out=("self_attn.out_proj",),
    mlp_out=("mlp.fc2",),
)
_BERT_MLP_OUT = r"layer\.\d+\.output\.dense"

ARCHITECTURES: dict[str, ArchTargets] = {
    "opt": ArchTargets(
        qv=("q_proj", "v_proj"),
        attention=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"),
        mlp=("fc1", "fc2"),
        attention_out=("self_attn.out_proj",),
        mlp_out=("fc2",),
    ),
    "llama": _LLAMA,  # SmolLM2 is a Llama
    "gemma3_text": _LLAMA,  # Gemma3ForCausalLM (text only)
    "gpt2": ArchTargets(
        qv=("c_attn",),  # fused q/k/v Conv1D: LoRA on it adapts k as well
        attention=("attn.c_attn", "attn.c_proj"),
        mlp=("mlp.c_fc", "mlp.c_proj"),
        attention_out=("attn.c_proj",),
        mlp_out=("mlp.c_proj",),
    ),
    "bert": ArchTargets(
        qv=("query", "value"),
        attention=(
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
        ),
        mlp=("intermediate.dense", _BERT_MLP_OUT),
        attention_out=("attention.output.dense",),
        mlp_out=(_BERT_MLP_OUT,),
    ),
    # transformers >= 5 renamed ViT's projections to q_proj/.../o_proj and mlp.fc1/fc2.
    "vit": ArchTargets(
        qv=("q_proj", "v_proj", "query", "value"),
        attention=(
            "attention.q_proj",
            "attention.k_proj",
            "attention.v_proj",
            "attention.o_proj",
            "attention.attention.query",
            "attention.attention.key",
            "attention.attention.value",
            "attention.output.dense",
        ),
        mlp=("mlp.fc1", "mlp.fc2", "intermediate.dense", _BERT_MLP_OUT),
        attention_out=("attention.o_proj", "attention.output.dense"),
        mlp_out=("mlp.fc2", _BERT_MLP_OUT),
    ),
    "clip": _CLIP,
    "clip_vision_model": _CLIP,
    "clip_text_model": _CLIP,
}


def arch_targets(model: nn.Module) -> ArchTargets:
    """The patterns for `model`'s architecture; raise with the known ones if it has none."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"no module table for model_type={model_type!r}; known: {', '.join(ARCHITECTURES)}. "
            "Pass targets=[...] explicitly (lora/adalora/randmask/structured), or add an entry to "
            "randmask.methods.targets.ARCHITECTURES."
        )
    return ARCHITECTURES[model_type]


def _matches(name: str, patterns: tuple[str, ...] | list[str]) -> bool:
    return any(re.search(rf"(?:^|\.)(?:{p})$", name) for p in patterns)


def match_modules(model: nn.Module, patterns: tuple[str, ...] | list[str]) -> list[tuple[str, nn.Module]]:
    """(name, module) for every submodule whose dotted name ends with one of `patterns`."""
    return [(n, m) for n, m in model.named_modules() if n and _matches(n, patterns)]


def require_modules(
    model: nn.Module, patterns: tuple[str, ...] | list[str], what: str
) -> list[tuple[str, nn.Module]]:
    """`match_modules`, raising a clear error when nothing matches."""
    found = match_modules(model, patterns)
    if not found:
        raise ValueError(
            f"no {what} modules match {list(patterns)} in {type(model).__name__}; "
            "check the names in model.named_modules() and update the table in methods/targets.py"
        )
    return found


def default_targets(model: nn.Module) -> list[str]:
    """Leaf names of the query and value projections present in `model` (the paper's targets)."""
    present = [p for p in arch_targets(model).qv if match_modules(model, (p,))]
    if not present:
        raise ValueError(f"none of {arch_targets(model).qv} found in {type(model).__name__}; pass targets=")
    return present


def default_head_modules(model: nn.Module) -> list[str]:
    """Freshly initialised task heads to train in every method.

    The top-level `classifier` or `score` module, when the model has one (sequence/image
    classification). For BERT also `pooler`: BERT-style heads are pooler + classifier, like the
    RoBERTa head that the LoRA paper trains, and sentence-transformer checkpoints (all-MiniLM)
    never trained their pooler. Pass ``head_modules=["classifier"]`` to freeze it.
    """
    heads = [n for n in ("classifier", "score") if isinstance(getattr(model, n, None), nn.Module)]
    base = getattr(model, "bert", None)
    if heads and base is not None and isinstance(getattr(base, "pooler", None), nn.Module):
        heads.append("pooler")
    return heads
