"""LoRA (Hu et al., 2021) via peft: r=8, alpha=16 on the query and value projections."""

from __future__ import annotations

from torch import nn

from randmask_lab.methods.common import (
    check_size_option,
    fix_peft_heads,
    peft_saver,
    peft_task_type,
    seeded,
    smallest_dim,
)
from randmask_lab.methods.prepared import PreparedModel, build_report
from randmask_lab.methods.targets import resolve, restrict_to_blocks, target_names, uses_conv1d


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

    resolved = resolve(model, targets)
    check_size_option("lora", "r", r, smallest_dim([t.module for t in resolved]),
                      "the rank of a matrix is at most its smallest dimension")
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_names(resolved),
        fan_in_fan_out=uses_conv1d(resolved),
        modules_to_save=list(heads) or None,
        task_type=peft_task_type(model),
    )
    with seeded(seed):  # LoRA's A init is random: make it depend on `seed` only
        wrapped = get_peft_model(model, config)
    fix_peft_heads(wrapped, heads)
    frozen = restrict_to_blocks(wrapped, resolved)
    labels = [t.label for t in resolved]
    report = build_report("lora", wrapped, total, heads, notes=[f"r={r}, alpha={alpha}, {len(labels)} matrices"],
                          frozen={"lora": frozen})
    return PreparedModel(wrapped, report, adapted=labels, save_native=peft_saver(wrapped))
