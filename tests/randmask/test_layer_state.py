"""A masked model's state dict carries its masks' identity (``randmask.layer_state``): ``load_state_dict`` refuses a
state from another masking, another written adapter or another base, in one line, and takes a state saved before
layers wrote one unchecked."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import model_output, tiny_inputs, tiny_model, trained

from randmask import MaskingConfig, MaskingError, apply_masking, disable_adapter, masked_layers, set_adapter
from randmask.layer_state import decode, encode

EXACT = dict(density=0.2, mask_kind="random_exact")  # the same entry count at every seed: a shape check passes


def _saved(**config) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    model = trained(apply_masking(tiny_model("llama"), MaskingConfig(**{**EXACT, "seed": 0, **config})), "llama")
    return model, model.state_dict()


def test_the_same_masking_on_the_same_base_loads_bit_for_bit() -> None:
    model, state = _saved()
    assert {k for k in state if k.endswith("_extra_state")} == {
        f"model.layers.{i}.self_attn.{p}_proj._extra_state" for i in range(2) for p in "qv"}
    resumed = apply_masking(tiny_model("llama"), MaskingConfig(**EXACT, seed=0))
    resumed.load_state_dict(state)
    assert torch.equal(model_output(resumed, tiny_inputs("llama")), model_output(model, tiny_inputs("llama")))


def test_another_mask_with_the_same_entry_counts_is_refused() -> None:
    _, state = _saved()
    other = apply_masking(tiny_model("llama"), MaskingConfig(**EXACT, seed=1))
    with pytest.raises(MaskingError, match=r"^model.layers.0.self_attn.q_proj: the state dict's adapter 'default' "
                                           "was drawn with another mask"):
        other.load_state_dict(state)


def test_another_base_is_refused() -> None:
    _, state = _saved()
    other = apply_masking(tiny_model("llama", seed=5), MaskingConfig(**EXACT, seed=0))
    with pytest.raises(MaskingError, match="saved from another base model .* load the base weights first, then "
                                           "apply_masking"):
        other.load_state_dict(state)


def test_a_state_saved_in_bf16_loads_into_the_fp32_masking_of_the_same_base() -> None:
    model, _ = _saved()
    state = model.to(torch.bfloat16).state_dict()  # W0's fingerprint compared in bf16, the widest dtype both have
    apply_masking(tiny_model("llama"), MaskingConfig(**EXACT, seed=0)).load_state_dict(state)
    with pytest.raises(MaskingError, match="saved from another base model"):
        apply_masking(tiny_model("llama", seed=5), MaskingConfig(**EXACT, seed=0)).load_state_dict(state)


def test_a_state_saved_inside_disable_adapter_from_another_base_is_refused() -> None:
    """Its weight holds W0 at every entry, so no W0 fingerprint was saved: the saved weight itself is compared with
    the W0 this layer holds (before, it loaded, and the next write mixed the two bases)."""
    model, _ = _saved()
    with disable_adapter(model):
        state = {k: v.clone() for k, v in model.state_dict().items()}  # as torch.save inside the block keeps it
    same = apply_masking(tiny_model("llama"), MaskingConfig(**EXACT, seed=0))
    same.load_state_dict(state)
    assert torch.equal(model_output(same, tiny_inputs("llama")), model_output(model, tiny_inputs("llama")))
    apply_masking(tiny_model("llama"), MaskingConfig(**EXACT, seed=0)).load_state_dict(
        {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state.items()})  # compared in bf16
    other = apply_masking(tiny_model("llama", seed=5), MaskingConfig(**EXACT, seed=0))
    with pytest.raises(MaskingError, match=r"^model.layers.0.self_attn.q_proj: the state dict was saved from another "
                                           "base model .*the active adapter's entries"):
        other.load_state_dict(state)


def test_another_written_adapter_is_refused_and_a_pristine_weight_loads() -> None:
    model = apply_masking(tiny_model("llama"), MaskingConfig(**EXACT, seed=0), adapter_name="a")
    apply_masking(model, MaskingConfig(**EXACT, seed=1), adapter_name="b")
    set_adapter(model, "a")
    with torch.no_grad():
        for layer in masked_layers(model).values():
            layer.adapters["a"].values.normal_()
    state = model.state_dict()
    set_adapter(model, "b")
    with pytest.raises(MaskingError, match=r"weight holds adapter 'a''s delta, this layer has adapter 'b' written "
                                           r"into it .* set_adapter\('a'\)"):
        model.load_state_dict(state)
    set_adapter(model, "a")
    with disable_adapter(model):
        pristine = model.state_dict()  # the weight holds W0 at every entry: any adapter may be live at load
        with pytest.raises(MaskingError, match="this layer has no adapter written into it"):
            model.load_state_dict(state)
    expected = model_output(model, tiny_inputs("llama"))
    model.load_state_dict(pristine)
    assert torch.equal(model_output(model, tiny_inputs("llama")), expected)


def test_a_state_saved_before_layers_wrote_one_loads_unchecked() -> None:
    model, state = _saved()
    legacy = {k: v for k, v in state.items() if not k.endswith("_extra_state")}
    resumed = apply_masking(tiny_model("llama"), MaskingConfig(**EXACT, seed=0))
    resumed.load_state_dict(legacy, strict=True)
    assert torch.equal(model_output(resumed, tiny_inputs("llama")), model_output(model, tiny_inputs("llama")))


@pytest.mark.parametrize("state", [
    torch.ones(3, dtype=torch.float32),  # not bytes
    torch.tensor(list(b"{not json"), dtype=torch.uint8),
    torch.tensor(list(b"[" * 200_000 + b"]" * 200_000), dtype=torch.uint8),  # nested deeper than json reads
    encode({"format": 99, "adapters": {}, "live": None, "w0": None}),  # a newer or foreign format
    encode({"format": 1, "adapters": {"default": 5}, "live": None, "w0": None}),
    torch.zeros(2, 2, dtype=torch.uint8),
])
def test_a_crafted_layer_state_is_one_line(state) -> None:
    with pytest.raises(MaskingError, match=r"^q: the state dict's randmask layer state is corrupt or not randmask's"):
        decode(state, "q")
    _, saved = _saved()
    saved["model.layers.1.self_attn.v_proj._extra_state"] = state
    with pytest.raises(MaskingError, match="model.layers.1.self_attn.v_proj: the state dict's randmask layer state"):
        apply_masking(tiny_model("llama"), MaskingConfig(**EXACT, seed=0)).load_state_dict(saved)


def test_a_peft_model_state_dict_is_checked_too() -> None:
    """PEFT's ``RandMaskLayer`` carries the same state; ``save_pretrained`` / ``from_pretrained`` (the adapter alone,
    checked by its own sealed config) never hold it, so only whole-model states meet this check."""
    pytest.importorskip("peft")
    from peft import get_peft_model

    from randmask.peft import RandMaskConfig

    peft_model = lambda seed: get_peft_model(tiny_model("llama"), RandMaskConfig(**EXACT, seed=seed))  # noqa: E731
    model = trained(peft_model(0), "llama")
    state = model.state_dict()
    same = peft_model(0)
    same.load_state_dict(state)
    assert torch.equal(model_output(same, tiny_inputs("llama")), model_output(model, tiny_inputs("llama")))
    with pytest.raises(MaskingError, match="the state dict's adapter 'default' was drawn with another mask"):
        peft_model(1).load_state_dict(state)
    with model.disable_adapter():
        disabled = model.state_dict()
    other_base = get_peft_model(tiny_model("llama", seed=5), RandMaskConfig(**EXACT, seed=0))
    with pytest.raises(MaskingError, match="saved from another base model"):
        other_base.load_state_dict(disabled)
    model.merge_adapter()
    with pytest.raises(MaskingError, match=r"weight has adapters \['default'\] merged into it, this layer \[\]"):
        peft_model(0).load_state_dict(model.state_dict())
