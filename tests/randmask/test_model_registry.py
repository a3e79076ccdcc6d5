"""randmask.registry, the per-model registry (test_registry.py is the lab task registry's name): adapters listed and
described, the layer cache kept right as layers come and go."""

from __future__ import annotations

import pytest
from tests.conftest import tiny_model

from randmask import MaskingConfig, MaskingError, apply_masking, delete_adapter, set_adapter, unload
from randmask.registry import adapter_meta, adapter_names, cached_layers, masked_layers


def test_the_layer_cache_follows_layers_wrapped_after_it_was_built():
    model = apply_masking(tiny_model("llama"), MaskingConfig(density=0.1, targets=["q_proj"]), adapter_name="a")
    set_adapter(model, "a")  # builds the cache: the q layers only
    assert len(cached_layers(model)) == 2
    apply_masking(model, MaskingConfig(density=0.1, targets=["v_proj"]), adapter_name="b")  # wraps the v layers
    set_adapter(model, "b")
    layers = masked_layers(model)
    assert len(cached_layers(model)) == len(layers) == 4
    assert {name.rsplit(".", 1)[-1]: layer.active_adapter for name, layer in layers.items()} == {
        "q_proj": None, "v_proj": "b"}


def test_adapter_meta_names_the_adapters_it_has():
    model = apply_masking(tiny_model("opt"), MaskingConfig(density=0.1), adapter_name="first")
    assert adapter_names(model) == ["first"]
    assert adapter_meta(model, "first")["config"].density == 0.1
    with pytest.raises(MaskingError, match=r"no randmask adapter 'second'; it has \['first'\]"):
        adapter_meta(model, "second")


def test_deleting_the_last_adapter_forgets_everything():
    model = apply_masking(tiny_model("gpt2"), MaskingConfig(density=0.1), adapter_name="only")
    set_adapter(model, "only")
    delete_adapter(model, "only")
    assert adapter_names(model) == [] and masked_layers(model) == {} and cached_layers(model) == ()
    assert not model._forward_pre_hooks  # the guard against PEFT-only kwargs went with the adapters
    assert unload(model) is model  # nothing left to unload: a no-op, not an error
