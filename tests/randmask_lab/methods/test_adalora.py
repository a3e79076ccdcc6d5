"""AdaLoRA via peft with the rank reallocation running through on_step."""

import pytest
import torch

from randmask_lab.methods import current_ranks, prepare_method

from .tiny import KV, D, batch, build, logits

INIT_R = 12


@pytest.mark.parametrize(
    ("arch", "per_layer"),
    [("opt", 2 * (INIT_R * 2 * D + INIT_R)),
     ("llama", INIT_R * 2 * D + INIT_R + INIT_R * (D + KV) + INIT_R),
     ("bert", 2 * (INIT_R * 2 * D + INIT_R))],
)
def test_count_and_identity_at_init(arch: str, per_layer: int) -> None:
    model = build(arch)
    before = logits(model, arch)
    prepared = prepare_method("adalora", model, total_steps=10)
    assert prepared.report.groups["adalora"] == 2 * per_layer
    torch.testing.assert_close(logits(prepared.model, arch), before)


def test_requires_total_steps() -> None:
    with pytest.raises(ValueError, match="adalora needs total_steps"):
        prepare_method("adalora", build("opt"))


def test_on_step_reallocates_ranks_to_target_budget() -> None:
    prepared = prepare_method("adalora", build("opt"), total_steps=10, tinit=1, tfinal=3)
    assert prepared.on_step is not None
    model = prepared.model.train()
    optimizer = torch.optim.AdamW(prepared.trainable_parameters(), lr=1e-2)
    budgets = []
    for step in range(10):
        model(**batch("opt")).loss.backward()
        optimizer.step()
        prepared.on_step(step)
        optimizer.zero_grad()
        budgets.append(sum(current_ranks(model).values()))
    n_matrices = 4
    assert budgets[0] == INIT_R * n_matrices
    assert budgets[-1] == 8 * n_matrices  # target_r on average
    assert budgets == sorted(budgets, reverse=True)


def test_on_step_without_gradients_says_when_to_call() -> None:
    prepared = prepare_method("adalora", build("opt"), total_steps=10)
    with pytest.raises(RuntimeError, match="before optimizer.zero_grad"):
        prepared.on_step(0)


def test_a_bf16_base_keeps_the_rank_divisor_frozen() -> None:
    """peft's bf16 upcast re-created ``ranknum`` as a trainable Parameter: AdamW moved the fixed rank divisor
    (12 -> 12.0005) and the run counted 4 more trainable entries than at fp32."""
    fp32 = prepare_method("adalora", build("llama"), total_steps=10)
    bf16 = prepare_method("adalora", build("llama").to(torch.bfloat16), total_steps=10)
    assert not [n for n, p in bf16.model.named_parameters() if "ranknum" in n and p.requires_grad]
    assert bf16.report.groups["adalora"] == fp32.report.groups["adalora"]
