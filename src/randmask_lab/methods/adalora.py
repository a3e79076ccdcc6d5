"""AdaLoRA (Zhang et al., 2023) via peft, with its rank reallocation actually running.

The paper's code built `AdaLoraModel` without `total_step` and never called
`update_and_allocate`, so its "AdaLoRA" was a fixed-rank SVD-form LoRA. Here `on_step` calls
`update_and_allocate` after every optimizer step, so ranks move from `init_r` per matrix to an
average of `target_r` (= LoRA's r=8 budget) on AdaLoRA's cubic schedule.

Schedule defaults follow the AdaLoRA repo's GLUE scripts (RTE: warm-up 600 and final 1800 of
3,900 steps, mask interval 1): `tinit` = 10% and `tfinal` = 40% of `total_steps`, `deltaT` = 1.
peft adds the orthogonality penalty only to a loss the model computes itself (labels passed to
forward); the runner computes its own loss, so `extra_loss` hands it the same penalty, and
`get_state` / `set_state` carry the allocator's importance scores through checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from randmask import Target
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

    resolved = _checked_targets(model, targets, total_steps, init_r, target_r)
    tinit = int(0.1 * total_steps) if tinit is None else tinit
    tfinal = int(0.4 * total_steps) if tfinal is None else tfinal
    schedule = dict(total_step=total_steps, tinit=tinit, tfinal=tfinal, deltaT=delta_t, beta1=beta1, beta2=beta2)
    config = AdaLoraConfig(
        init_r=init_r,
        target_r=target_r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_names(resolved),
        fan_in_fan_out=uses_conv1d(resolved),
        **schedule,
        orth_reg_weight=orth_reg_weight,
        modules_to_save=list(heads) or None,
        task_type=peft_task_type(model),
    )
    with seeded(seed):
        wrapped = get_peft_model(model, config)
    # peft 0.21 upcasts a bf16 adapter by assigning a plain tensor into its ParameterDicts, which makes a new
    # Parameter with requires_grad=True: the fixed rank divisor ``ranknum`` then trained (a bf16-true run was another
    # method, with 4 more trainable entries, recorded as adalora). It is a constant of the method: frozen here.
    for name, param in wrapped.named_parameters():
        if ".ranknum." in f".{name}.":
            param.requires_grad_(False)
    fix_peft_heads(wrapped, heads)
    frozen = restrict_to_blocks(wrapped, resolved)
    return _prepared(wrapped, resolved, total, heads, frozen, schedule, init_r, target_r)


def _checked_targets(model: nn.Module, targets: list[str] | None, total_steps: int | None, init_r: int,
                     target_r: int) -> list[Target]:
    """The resolved target matrices, once the schedule's step count and the ranks are known to fit them."""
    if total_steps is None or total_steps < 1:
        raise ValueError(
            "adalora needs total_steps (the number of optimizer steps of the run) to schedule its "
            "rank budget: prepare_method('adalora', model, total_steps=...)"
        )
    resolved = resolve(model, targets)
    rank_limit = smallest_dim([t.module for t in resolved])
    check_size_option("adalora", "init_r", init_r, rank_limit, "the rank of a matrix is at most its smallest dimension")
    check_size_option("adalora", "target_r", target_r, init_r, "the rank budget only shrinks from init_r")
    return resolved


def _prepared(wrapped: nn.Module, resolved: list[Target], total: int, heads: list[str], frozen: int,
              schedule: dict[str, Any], init_r: int, target_r: int) -> PreparedModel:
    """The wrapped model with its report and hooks: rank reallocation, orthogonality penalty, allocator state."""
    total_steps, tinit, tfinal, delta_t = (schedule[k] for k in ("total_step", "tinit", "tfinal", "deltaT"))
    n_matrices = len(current_ranks(wrapped))
    notes = [
        f"rank budget {init_r}x{n_matrices} -> {target_r}x{n_matrices} over total_step={total_steps} "
        f"(tinit={tinit}, tfinal={tfinal}, deltaT={delta_t}); trainable count is at init_r, "
        "pruned ranks are masked to zero, not removed"
    ]
    report = build_report("adalora", wrapped, total, heads, notes=notes, frozen={"adalora": frozen})
    return PreparedModel(wrapped, report, on_step=_allocator(wrapped, total_steps - tfinal),
                         adapted=[t.label for t in resolved], extra_loss=lambda: orth_penalty(wrapped),
                         get_state=lambda: allocator_state(wrapped),
                         set_state=lambda tensors, meta: restore_allocator_state(wrapped, tensors, meta),
                         save_native=peft_saver(wrapped))


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


def orth_penalty(model: nn.Module) -> torch.Tensor | None:
    """AdaLoRA's orthogonality regulariser, as peft's ``AdaLoraModel.forward`` adds it to ``outputs.loss``:
    mean over the A and B matrices of ||P P^T - I||_F, times orth_reg_weight."""
    tuner = model.base_model
    name = tuner.trainable_adapter_name
    weight = tuner.peft_config[name].orth_reg_weight
    terms = []
    for n, p in model.named_parameters():
        if ("lora_A" in n or "lora_B" in n) and name in n:
            cov = p @ p.T if "lora_A" in n else p.T @ p  # (r, r)
            terms.append(torch.linalg.matrix_norm(cov - torch.eye(*cov.shape, device=p.device, dtype=p.dtype)))
    return weight * torch.stack(terms).mean() if terms else None


_SCORES = ("ipt", "exp_avg_ipt", "exp_avg_unc")


def allocator_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The rank allocator's state (importance scores, rank pattern) for a checkpoint."""
    tuner = model.base_model
    alloc = tuner.rankallocator
    tensors = {f"{kind}.{n}": t.detach().cpu().contiguous()
               for kind in _SCORES for n, t in getattr(alloc, kind).items()}
    config = tuner.peft_config[tuner.trainable_adapter_name]
    pattern = {k: [bool(b) for b in v] for k, v in (config.rank_pattern or {}).items()}
    return tensors, {"rank_pattern": pattern or None}


def restore_allocator_state(model: nn.Module, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Inverse of ``allocator_state``."""
    tuner = model.base_model
    alloc = tuner.rankallocator
    device = next(model.parameters()).device
    for kind in _SCORES:
        setattr(alloc, kind, {n.split(".", 1)[1]: t.to(device) for n, t in tensors.items()
                              if n.split(".", 1)[0] == kind})
    tuner.peft_config[tuner.trainable_adapter_name].rank_pattern = meta.get("rank_pattern")
