"""LoRA (Hu et al., 2021) via peft: r=8, alpha=16 on the query and value projections."""

from __future__ import annotations

from torch import nn

from randmask.methods.common import fix_peft_heads, peft_task_type, seeded
from randmask.methods.prepared import PreparedModel, build_report
from randmask.methods.targets import default_targets, match_modules


def uses_conv1d(model: nn.Module, targets: list[str]) -> bool:
    """True when a target is a GPT-2 style Conv1D (weight stored as (in, out))."""
    found = match_modules(model, targets)
    return any(type(m).__name__ == "Conv1D" for _, m in found)


def prepare_lora(
    model: nn.Module,
    *,
    total: int,
    heads: list[str],
    targets: list[str] | None,
    seed: int = 0,
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.0,
) -> PreparedModel:
    """Wrap `model` with peft LoRA adapters on `targets`; heads go to `modules_to_save`."""
    from peft import LoraConfig, get_peft_model

    targets = default_targets(model) if targets is None else list(targets)
    if not match_modules(model, targets):
        raise ValueError(f"no module of {type(model).__name__} matches targets={targets}")
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(targets),
        fan_in_fan_out=uses_conv1d(model, targets),
        modules_to_save=list(heads) or None,
        task_type=peft_task_type(model),
    )
    with seeded(seed):  # LoRA's A init is random: make it depend on `seed` only
        wrapped = get_peft_model(model, config)
    fix_peft_heads(wrapped, heads)
    report = build_report("lora", wrapped, total, heads, notes=[f"r={r}, alpha={alpha}, targets={targets}"])
    return PreparedModel(wrapped, report)
