"""The lab's view of the library's one target resolver (``randmask.resolve_targets``).

Every method adapts matrices from the same tables (``randmask.targets.ARCHITECTURES``): q/v for
randmask, structured, LoRA and AdaLoRA; all attention and MLP projections for BitFit; the
attention and MLP output projections for Houlsby adapters. On GPT-2's fused ``c_attn``, q/v means
its q and v column blocks for every method: peft's LoRA/AdaLoRA adapt the whole ``c_attn``, and
``restrict_to_blocks`` keeps the k rows of their B at zero, so they too adapt only q and v.
"""

from __future__ import annotations

import torch
from torch import nn

from randmask import Target, default_targets, resolve_targets


def resolve(model: nn.Module, targets: list[str] | None, which: str = "qv") -> list[Target]:
    """``targets`` (or the architecture's set ``which``) resolved to modules and blocks."""
    return resolve_targets(model, default_targets(model, which) if targets is None else list(targets))


def target_names(resolved: list[Target]) -> list[str]:
    """Full module names, for peft's ``target_modules`` (exact names, so nothing else matches)."""
    return [t.name for t in resolved]


def uses_conv1d(resolved: list[Target]) -> bool:
    """True when a target is a GPT-2 style Conv1D (weight stored as (in, out): peft's fan_in_fan_out)."""
    return any(type(t.module).__name__ == "Conv1D" for t in resolved)


def restrict_to_blocks(wrapped: nn.Module, resolved: list[Target], b_name: str = "lora_B") -> int:
    """Keep peft's B rows outside each target's blocks at zero; return how many entries that freezes.

    delta W = B A (LoRA) or B (E * A) (AdaLoRA): row i of delta W is row i of B times the rest,
    so zero rows of B (kept zero by a gradient hook; AdamW's decoupled decay keeps 0 at 0) adapt
    only the target's rows, e.g. the q and v blocks of GPT-2's c_attn.
    """
    frozen = 0
    for target in resolved:
        if target.whole:
            continue
        for name, param in wrapped.named_parameters():
            owner, sep, _ = name.partition(f".{b_name}.")
            if not sep or not ("." + owner).endswith("." + target.name):
                continue
            keep = torch.zeros(param.shape[0], dtype=torch.bool, device=param.device)
            for _, start, stop in target.blocks:
                keep[start:stop] = True
            with torch.no_grad():
                param[~keep] = 0
            row_mask = keep.to(param.dtype).unsqueeze(1)
            param.register_hook(lambda grad, m=row_mask: grad * m)
            frozen += int((~keep).sum()) * param.shape[1]
    return frozen


def match_modules(model: nn.Module, suffixes: list[str]) -> list[tuple[str, nn.Module]]:
    """(name, module) for every submodule whose dotted name ends with one of ``suffixes``."""
    return [(n, m) for n, m in model.named_modules()
            if n and any(n == s or n.endswith("." + s) for s in suffixes)]


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
