"""randmask and structured through the method interface (the core is tested under tests/)."""

import pytest
import torch

from randmask_lab.methods import prepare_method

from .tiny import HEAD, KV, LAYERS, D, build, logits

QV = {"opt": 2 * D * D, "llama": D * D + KV * D, "gpt2": 2 * D * D, "bert": 2 * D * D}


@pytest.mark.parametrize("name", ["randmask", "structured"])
@pytest.mark.parametrize("arch", list(QV))
def test_full_density_count_and_identity(name: str, arch: str) -> None:
    model = build(arch)
    before = logits(model, arch)
    report = prepare_method(name, model, density=1.0).report
    assert report.groups["values"] == LAYERS * QV[arch]  # GPT-2: only c_attn's q and v blocks
    assert report.groups.get("head", 0) == (HEAD if arch == "bert" else 0)
    torch.testing.assert_close(logits(model, arch), before)


def test_ratio_is_a_fraction_of_all_parameters() -> None:
    model = build("opt")
    total = sum(p.numel() for p in model.parameters())
    report = prepare_method("randmask", model, ratio=0.02, seed=1).report
    assert report.total == total
    assert report.trainable == pytest.approx(0.02 * total, rel=0.25)


def test_structured_density_is_exact() -> None:
    report = prepare_method("structured", build("opt"), density=0.25).report
    assert report.trainable == LAYERS * 2 * D * D // 4


def test_needs_exactly_one_budget() -> None:
    with pytest.raises(ValueError, match="exactly one of ratio="):
        prepare_method("randmask", build("opt"))
    with pytest.raises(ValueError, match="exactly one of ratio="):
        prepare_method("randmask", build("opt"), ratio=0.1, density=0.1)


def test_same_seed_same_mask() -> None:
    a = prepare_method("randmask", build("opt"), density=0.3, seed=5).report.trainable
    b = prepare_method("randmask", build("opt"), density=0.3, seed=5).report.trainable
    assert a == b
