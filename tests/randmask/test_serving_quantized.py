"""Serving on quantized bases (issue 25 x issue 24): mixed batches, hot-swap and merges on the delta path never
write the stored quantized weight, and a mixed batch still equals each sample run alone."""

from __future__ import annotations

import pytest
import torch
from tests.randmask.quantized_models import load_quantized, save_tiny_llama

import randmask
from randmask import BASE_ADAPTER, MaskingConfig, add_weighted_adapter, apply_masking, mixed_batch, set_adapter

SCHEMES = ["nf4", "ao-int8", "ao-nf4"]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def _fill(adapters, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in adapters:
            adapter.values.copy_(torch.randn(adapter.nnz, generator=gen) * 0.3)


def _base_out(model, ids, disable):
    with torch.no_grad(), disable():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("scheme", SCHEMES)
def test_free_api_mixed_batch_swap_and_merge_on_a_quantized_base(llama_dir, scheme):
    model = load_quantized(llama_dir, scheme)
    for seed, name in enumerate(["a", "b"]):
        apply_masking(model, MaskingConfig(targets=["q_proj", "v_proj"], density=0.2, seed=seed), adapter_name=name)
    _fill([a for layer in randmask.masked_layers(model).values() for a in layer.adapters.values()], 0)
    ids = torch.randint(1, 128, (3, 7), generator=torch.Generator().manual_seed(1))
    base = _base_out(model, ids, lambda: randmask.disable_adapter(model))
    names = ["b", BASE_ADAPTER, "a"]
    alone = []
    with torch.no_grad():
        for i, name in enumerate(names):
            set_adapter(model, "a" if name == BASE_ADAPTER else name)  # a switch: no write into the weight
            with randmask.disable_adapter(model) if name == BASE_ADAPTER else torch.no_grad():
                alone.append(model(input_ids=ids[i:i + 1]).logits)
        with mixed_batch(model, names):
            mixed = model(input_ids=ids).logits
    torch.testing.assert_close(mixed, torch.cat(alone), atol=1e-5, rtol=0)
    assert not torch.equal(alone[0], alone[2])
    add_weighted_adapter(model, ["a", "b"], [1.0, 1.0], "ab")
    assert torch.equal(_base_out(model, ids, lambda: randmask.disable_adapter(model)), base)  # weight untouched
    layer = randmask.masked_layers(model)["model.layers.0.self_attn.q_proj"]
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        frozen = layer.base_layer(x)  # (2, 5, out)
        deltas = []
        for name in ("a", "b", "ab"):
            set_adapter(model, name)
            deltas.append(layer(x) - frozen)
    # A linear merge on the delta path: the merged layer adds the sum of the two deltas.
    torch.testing.assert_close(deltas[2], deltas[0] + deltas[1], atol=1e-5, rtol=0)
    assert deltas[0].abs().max() > 1e-2


@pytest.mark.parametrize("scheme", SCHEMES)
def test_peft_adapter_names_and_set_adapter_on_a_quantized_base(llama_dir, scheme):
    peft = pytest.importorskip("peft")
    from randmask.peft import RandMaskConfig, RandMaskLayer

    model = peft.get_peft_model(load_quantized(llama_dir, scheme),
                                RandMaskConfig(target_modules=["q_proj", "v_proj"], density=0.2, seed=0),
                                adapter_name="x")
    model.add_adapter("y", RandMaskConfig(target_modules=["q_proj", "v_proj"], density=0.2, seed=1))
    layers = [m for m in model.modules() if isinstance(m, RandMaskLayer)]
    _fill([a for layer in layers for a in layer.randmask_adapters.values()], 0)
    model.eval()
    ids = torch.randint(1, 128, (3, 6), generator=torch.Generator().manual_seed(2))
    base = _base_out(model, ids, model.disable_adapter)
    names = ["y", "__base__", "x"]
    alone = []
    with torch.no_grad():
        for i, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    alone.append(model(input_ids=ids[i:i + 1]).logits)
            else:
                model.set_adapter(name)  # the hot-swap writes nothing into a quantized weight
                alone.append(model(input_ids=ids[i:i + 1]).logits)
        mixed = model(input_ids=ids, adapter_names=names).logits
    torch.testing.assert_close(mixed, torch.cat(alone), atol=1e-5, rtol=0)
    assert all(layer._live is None for layer in layers)
    assert torch.equal(_base_out(model, ids, model.disable_adapter), base)
    model.add_weighted_adapter(["x", "y"], [1.0, 0.5], "xy")
    with torch.no_grad():
        out = model(input_ids=ids, adapter_names=["xy", "x", "xy"]).logits
    assert not torch.equal(out[0], alone[2][0])
