"""AdaLoRA (Zhang et al., 2023) via peft, with its rank reallocation actually running.

The paper's code built `AdaLoraModel` without `total_step` and never called
`update_and_allocate`, so its "AdaLoRA" was a fixed-rank SVD-form LoRA. Here `on_step` calls
`update_and_allocate` after every optimizer step, so ranks move from `init_r` per matrix to an
average of `target_r` (= LoRA's r=8 budget) on AdaLoRA's cubic schedule.

Schedule defaults follow the AdaLoRA repo's GLUE scripts (RTE: warm-up 600 and final 1800 of
3,900 steps, mask interval 1): `tinit` = 10% and `tfinal` = 40% of `total_steps`, `deltaT` = 1.
The orthogonality penalty is added by peft to `outputs.loss`, so it applies only when the
model computes the loss itself (labels passed to forward).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from randmask_lab.methods.common import fix_peft_heads, peft_task_type, seeded
from randmask_lab.methods.prepared import PreparedModel, build_report
from randmask_lab.methods.targets import resolve, restrict_to_blocks, target_names, uses_conv1d


def prepare_adalora(
    model: nn.Module,
    *,
    total: int,
    heads: list[str],
    targets: list[str] | None,
    total_steps: int | None,
    seed: int = 0,
    init_r: int = 12,
    target_r: int = 8,
    alpha: int = 16,
    tinit: int | None = None,
    tfinal: int | None = None,
    delta_t: int = 1,
    beta1: float = 0.85,
    beta2: float = 0.85,
    orth_reg_weight: float = 0.5,
    dropout: float = 0.0,
) -> PreparedModel:
    """Wrap `model` with peft AdaLoRA on `targets`; `on_step` runs the rank reallocation."""
    from peft import AdaLoraConfig, get_peft_model

    if total_steps is None or total_steps < 1:
        raise ValueError(
            "adalora needs total_steps (the number of optimizer steps of the run) to schedule its "
            "rank budget: prepare_method('adalora', model, total_steps=...)"
        )
    resolved = resolve(model, targets)
    tinit = int(0.1 * total_steps) if tinit is None else tinit
    tfinal = int(0.4 * total_steps) if tfinal is None else tfinal
    config = AdaLoraConfig(
        init_r=init_r,
        target_r=target_r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_names(resolved),
        fan_in_fan_out=uses_conv1d(resolved),
        total_step=total_steps,
        tinit=tinit,
        tfinal=tfinal,
        deltaT=delta_t,
        beta1=beta1,
        beta2=beta2,
        orth_reg_weight=orth_reg_weight,
        modules_to_save=list(heads) or None,
        task_type=peft_task_type(model),
    )
    with seeded(seed):
        wrapped = get_peft_model(model, config)
    fix_peft_heads(wrapped, heads)
    frozen = restrict_to_blocks(wrapped, resolved)
    n_matrices = len(current_ranks(wrapped))
    notes = [
        f"rank budget {init_r}x{n_matrices} -> {target_r}x{n_matrices} over total_step={total_steps} "
        f"(tinit={tinit}, tfinal={tfinal}, deltaT={delta_t}); trainable count is at init_r, "
        "pruned ranks are masked to zero, not removed"
    ]
    report = build_report("adalora", wrapped, total, heads, notes=notes, frozen={"adalora": frozen})
    return PreparedModel(wrapped, report, on_step=_allocator(wrapped, total_steps - tfinal),
                         adapted=[t.label for t in resolved])


def _allocator(wrapped: nn.Module, last_scoring_step: int) -> Callable[[int], None]:
    """The per-step hook: peft's `update_and_allocate`, with a clear error if grads are gone."""
    tuner = wrapped.base_model
    lora_e = [p for n, p in wrapped.named_parameters() if "lora_E" in n]

    def on_step(step: int) -> None:
        if step <= last_scoring_step and lora_e and lora_e[0].grad is None:
            raise RuntimeError(
                "AdaLoRA's on_step scores ranks from this step's gradients: call it after "
                "optimizer.step() and before optimizer.zero_grad()"
            )
        tuner.update_and_allocate(step)

    return on_step


def current_ranks(model: nn.Module) -> dict[str, int]:
    """Live rank of each AdaLoRA matrix: `init_r` until the first reallocation, then the
    number of singular values the budget kept (peft's `rank_pattern`)."""
    config = model.peft_config["default"]
    pattern = config.rank_pattern or {}
    ranks = {}
    for name, p in model.named_parameters():
        if name.endswith("lora_E.default"):
            kept = pattern.get(name.removeprefix("base_model.model."))
            ranks[name.removesuffix(".lora_E.default")] = sum(kept) if kept is not None else p.shape[0]
    return ranks
