"""LoRA r=8, alpha=16 on q/v via peft."""

import pytest
import torch

from randmask_lab.methods import prepare_method

from .tiny import HEAD, KV, D, batch, build, logits

R = 8
LORA = {  # per layer: r * (d_in + d_out) for q and for v
    "opt": R * (D + D) * 2,
    "llama": R * (D + D) + R * (D + KV),
    "gemma3": R * (D + D) + R * (D + KV),
    "gpt2": R * (D + 2 * D),  # fused c_attn: A (r x D) and the q and v rows of B (k rows held at zero)
    "bert": R * (D + D) * 2,
}


@pytest.mark.parametrize("arch", list(LORA))
def test_count_and_identity_at_init(arch: str) -> None:
    model = build(arch)
    before = logits(model, arch)
    prepared = prepare_method("lora", model)
    assert prepared.report.groups["lora"] == 2 * LORA[arch]
    assert prepared.report.groups.get("head", 0) == (HEAD if arch == "bert" else 0)
    torch.testing.assert_close(logits(prepared.model, arch), before)


def test_options_change_rank() -> None:
    assert prepare_method("lora", build("opt"), r=2).report.trainable == 2 * 2 * 2 * (D + D)


def test_head_trains_and_can_be_frozen() -> None:
    prepared = prepare_method("lora", build("bert"))
    prepared.model.train()
    prepared.model(**batch("bert")).loss.backward()
    grads = {n: p.grad for n, p in prepared.model.named_parameters() if p.requires_grad}
    assert any("classifier.modules_to_save" in n and g is not None for n, g in grads.items())
    assert any("pooler.modules_to_save" in n for n in grads)
    frozen = prepare_method("lora", build("bert"), head_modules=[]).report
    assert frozen.groups == {"lora": 2 * LORA["bert"]}
    classifier_only = prepare_method("lora", build("bert"), head_modules=["classifier"]).report
    assert classifier_only.groups["head"] == D * 2 + 2


def test_explicit_targets() -> None:
    report = prepare_method("lora", build("opt"), targets=["fc1"]).report
    assert report.trainable == 2 * R * (D + 64)
