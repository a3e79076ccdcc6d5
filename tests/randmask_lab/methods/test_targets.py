"""Every method resolves its matrices through the library's one target resolver."""

import pytest
import torch

from randmask import default_targets, resolve_targets
from randmask_lab.methods import default_head_modules, prepare_method

from .tiny import D, build

QV_METHODS = ["randmask", "structured", "lora", "adalora"]


@pytest.mark.parametrize("arch", ["opt", "llama", "gpt2", "bert"])
def test_every_method_adapts_the_same_matrices(arch: str) -> None:
    """randmask, structured, LoRA and AdaLoRA adapt the q/v matrices (GPT-2: blocks) of the table;
    BitFit and adapters adapt the table's all-linear and output-projection sets."""
    reference = build(arch)
    qv = [t.label for t in resolve_targets(reference)]
    budget = {"randmask": {"density": 0.1}, "structured": {"density": 0.1}, "adalora": {"total_steps": 10}}
    for method in QV_METHODS:
        assert prepare_method(method, build(arch), **budget.get(method, {})).adapted == qv, method
    assert prepare_method("bitfit", build(arch)).adapted == [
        t.label for t in resolve_targets(reference, default_targets(reference, "all_linear"))]
    sites = default_targets(reference, "attention_out") + default_targets(reference, "mlp_out")
    assert sorted(prepare_method("adapter", build(arch)).adapted) == sorted(
        t.label for t in resolve_targets(reference, sites))


def test_gpt2_lora_trains_only_q_and_v_rows() -> None:
    """peft's LoRA wraps the whole fused c_attn; the k rows of B stay zero through training."""
    prepared = prepare_method("lora", build("gpt2"))
    r, layers = 8, 2
    # A: r x D, B: 3D x r of which the D k-rows are held at zero
    assert prepared.report.groups["lora"] == layers * (r * D + 2 * D * r)
    params = dict(prepared.model.named_parameters())
    b_name = next(n for n in params if "c_attn.lora_B" in n)
    opt = torch.optim.AdamW(prepared.trainable_parameters(), lr=1e-2)
    ids = torch.randint(0, 64, (2, 8))
    for _ in range(3):
        prepared.model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    b = params[b_name].detach()
    assert b[D:2 * D].abs().max() == 0  # k block untouched
    assert b[:D].abs().max() > 0 and b[2 * D:].abs().max() > 0


@pytest.mark.parametrize("arch", ["vit", "clip_vision"])
def test_vision_models(arch: str) -> None:
    head = D * 3 + 3 if arch == "vit" else 0  # ViT's fresh 3-way classifier
    pixels = torch.randn(2, 3, 16, 16)
    for name, group, expected in [("lora", "lora", 2 * 2 * 8 * 2 * D), ("adapter", "adapter", 4 * 552)]:
        model = build(arch)
        with torch.no_grad():
            before = model(pixel_values=pixels)[0]
        prepared = prepare_method(name, model)
        assert prepared.report.groups == ({group: expected, "head": head} if head else {group: expected})
        with torch.no_grad():
            torch.testing.assert_close(prepared.model(pixel_values=pixels)[0], before)


def test_default_heads() -> None:
    assert default_head_modules(build("bert")) == ["classifier", "pooler"]
    assert default_head_modules(build("opt")) == []
