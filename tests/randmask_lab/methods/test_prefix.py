"""Prefix tuning via peft, initialised from real activations."""

import pytest
import torch

from randmask_lab.methods import prepare_method

from .tiny import KV, LAYERS, D, batch, build

TOKENS = 5


@pytest.mark.parametrize(("arch", "kv_dim"), [("opt", D), ("llama", KV), ("gpt2", D), ("gemma3", KV)])
def test_count_forward_backward(arch: str, kv_dim: int) -> None:
    prepared = prepare_method("prefix", build(arch))
    assert prepared.report.trainable == TOKENS * LAYERS * 2 * kv_dim
    model = prepared.model.train()
    model(**batch(arch)).loss.backward()
    grads = [p.grad for p in prepared.trainable_parameters()]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("arch", ["opt", "llama"])
def test_real_init_equals_prepending_the_real_tokens(arch: str) -> None:
    # The paper initialises the prefix with the activations of real words: at init the prefixed
    # model must equal the base model run on those words followed by the input.
    base = build(arch)
    words = torch.randint(0, 64, (1, TOKENS), generator=torch.Generator().manual_seed(7))
    ids = batch(arch)["input_ids"][:1]
    with torch.no_grad():
        expected = base(input_ids=torch.cat([words, ids], dim=1)).logits[:, TOKENS:]
    prepared = prepare_method("prefix", base, seed=7)
    with torch.no_grad():
        got = prepared.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    torch.testing.assert_close(got, expected)


def test_random_init_option() -> None:
    report = prepare_method("prefix", build("opt"), init="random", num_virtual_tokens=3).report
    assert report.trainable == 3 * LAYERS * 2 * D


def test_sequence_classifier_is_refused_with_reason() -> None:
    with pytest.raises(ValueError, match="causal LMs"):
        prepare_method("prefix", build("bert"))
