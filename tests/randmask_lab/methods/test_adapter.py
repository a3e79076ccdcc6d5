"""Houlsby adapters after the attention and MLP output projections."""

import pytest
import torch

from randmask_lab.methods import prepare_method

from .tiny import HEAD, LAYERS, D, batch, build, logits

WIDTH = 8
PER_ADAPTER = D * WIDTH + WIDTH + WIDTH * D + D  # down (w, b) + up (w, b)


@pytest.mark.parametrize("arch", ["opt", "llama", "gemma3", "gpt2", "bert"])
def test_count_and_identity_at_init(arch: str) -> None:
    model = build(arch)
    before = logits(model, arch)
    report = prepare_method("adapter", model).report
    assert report.groups["adapter"] == 2 * LAYERS * PER_ADAPTER
    assert report.groups.get("head", 0) == (HEAD if arch == "bert" else 0)
    torch.testing.assert_close(logits(model, arch), before)


def test_train_norms_adds_layer_norms() -> None:
    report = prepare_method("adapter", build("opt"), train_norms=True).report
    assert report.groups == {"adapter": 2 * LAYERS * PER_ADAPTER, "norm": 5 * 2 * D}


def test_adapters_change_the_output_once_trained() -> None:
    prepared = prepare_method("adapter", build("opt"), width=4)
    assert prepared.report.trainable == 2 * LAYERS * (2 * D * 4 + 4 + D)
    model = prepared.model.train()
    model(**batch("opt")).loss.backward()
    ups = [p for n, p in model.named_parameters() if ".adapter.up." in n]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ups)


def test_same_seed_same_init() -> None:
    a = prepare_method("adapter", build("opt"), seed=3).trainable_state_dict()
    b = prepare_method("adapter", build("opt"), seed=3).trainable_state_dict()
    c = prepare_method("adapter", build("opt"), seed=4).trainable_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
