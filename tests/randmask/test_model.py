"""PEFT's invariant matrix for randmask over tiny OPT, Llama, GPT-2 and BERT (and ViT) models."""

from __future__ import annotations

import copy

import pytest
import torch
from tests.conftest import model_output, tiny_inputs, tiny_model, train_steps

from randmask import (
    BASE_ADAPTER,
    MaskingConfig,
    MaskingError,
    adapter_names,
    add_weighted_adapter,
    apply_masking,
    count_base_parameters,
    delete_adapter,
    disable_adapter,
    masked_layers,
    masking_summary,
    merge_and_unload,
    mixed_batch,
    set_adapter,
    unload,
)


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "values" not in n}


def test_output_unchanged_at_init(arch):
    model = tiny_model(arch)
    inputs = tiny_inputs(arch)
    before = model_output(model, inputs)
    apply_masking(model, MaskingConfig(density=0.1))
    assert torch.equal(model_output(model, inputs), before)


def test_only_values_are_trainable(arch):
    model = apply_masking(tiny_model(arch), MaskingConfig(trainable_ratio=1e-2))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".values") for n in trainable)
    summary = masking_summary(model)
    assert summary.trainable == sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)
    assert summary.total_params == count_base_parameters(model)
    assert 0.5e-2 < summary.ratio < 2e-2


def test_training_moves_only_kept_entries(arch):
    model = tiny_model(arch)
    inputs = tiny_inputs(arch)
    pristine = _weights(model)
    apply_masking(model, MaskingConfig(density=0.2))
    losses = train_steps(model, inputs)
    assert losses[-1] < losses[0]
    model_output(model, inputs)  # any forward syncs; weights must now hold W0 + delta
    layers = masked_layers(model)
    for name, param in model.named_parameters():
        if name.endswith(".values"):
            continue
        original = pristine[name.replace(".base_layer", "")]
        layer_name = name.rsplit(".base_layer.", 1)[0]
        if name.endswith("base_layer.weight") and layer_name in layers:
            adapter = layers[layer_name].adapters["default"]
            changed = (param.detach() != original).reshape(-1).nonzero().reshape(-1)
            assert set(changed.tolist()) <= set(adapter.indices.tolist())
            assert changed.numel() > 0
            kept = param.detach().reshape(-1)[adapter.indices]
            assert torch.equal(kept, adapter.base_values + adapter.values.detach())
        else:
            assert torch.equal(param.detach(), original), name


def test_merge_equals_unmerged_and_unload_restores(arch):
    model = tiny_model(arch)
    inputs = tiny_inputs(arch)
    pristine = _weights(model)
    base_out = model_output(model, inputs)
    apply_masking(model, MaskingConfig(density=0.2))
    train_steps(model, inputs)
    trained_out = model_output(model, inputs)
    assert not torch.equal(trained_out, base_out)

    merged = merge_and_unload(copy.deepcopy(model))
    assert not masked_layers(merged)
    assert torch.equal(model_output(merged, inputs), trained_out)

    with disable_adapter(model):
        assert torch.equal(model_output(model, inputs), base_out)
    assert torch.equal(model_output(model, inputs), trained_out)

    plain = unload(model)
    assert not masked_layers(plain) and not adapter_names(plain)
    restored = {n: p for n, p in plain.named_parameters()}
    for name, original in pristine.items():
        assert torch.equal(restored[name.replace(".base_layer", "")], original), name
    assert torch.equal(model_output(plain, inputs), base_out)


def test_second_adapter_and_switching():
    arch = "llama"
    model = tiny_model(arch)
    inputs = tiny_inputs(arch)
    base_out = model_output(model, inputs)
    apply_masking(model, MaskingConfig(density=0.3, seed=0), adapter_name="a")
    train_steps(model, inputs)
    out_a = model_output(model, inputs)
    apply_masking(model, MaskingConfig(density=0.3, seed=1), adapter_name="b")
    # The new adapter is active and starts from the pristine base, even where the masks overlap.
    assert torch.equal(model_output(model, inputs), base_out)
    assert all(n.endswith(".b.values") for n, p in model.named_parameters() if p.requires_grad)
    train_steps(model, inputs)
    out_b = model_output(model, inputs)
    assert not torch.equal(out_b, out_a)
    set_adapter(model, "a")
    assert torch.equal(model_output(model, inputs), out_a)
    set_adapter(model, "b")
    assert torch.equal(model_output(model, inputs), out_b)
    assert adapter_names(model) == ["a", "b"]


def test_a_second_adapter_on_other_modules_is_the_only_active_one():
    """The newest adapter is the active one on every layer: the layers only the first adapts compute with W0."""
    model, inputs = tiny_model("llama"), tiny_inputs("llama")
    apply_masking(model, MaskingConfig(density=0.3, targets=["q_proj"]), adapter_name="a")
    train_steps(model, inputs)
    apply_masking(model, MaskingConfig(density=0.3, targets=["k_proj"]), adapter_name="b")
    train_steps(model, inputs)
    alone = copy.deepcopy(model)
    delete_adapter(alone, "a")  # b on its own
    assert {n.rsplit(".", 1)[-1]: layer.active_adapter for n, layer in masked_layers(model).items()} == {
        "q_proj": None, "k_proj": "b"}
    assert torch.equal(model_output(model, inputs), model_output(alone, inputs))
    assert torch.equal(model_output(merge_and_unload(model), inputs), model_output(alone, inputs))


def test_unload_and_merge_inside_disable_adapter_or_a_mixed_batch_take_effect_at_once():
    """Before, the with-block's end wrote the adapter back into the unloaded model's weights."""
    inputs = tiny_inputs("llama")
    pristine = tiny_model("llama")
    base_out = model_output(pristine, inputs)

    def adapted():
        model = apply_masking(tiny_model("llama"), MaskingConfig(density=0.3))
        train_steps(model, inputs)
        return model

    for context in (disable_adapter, lambda m: mixed_batch(m.eval(), [BASE_ADAPTER, "default"])):
        model = adapted()
        with context(model):
            unload(model)
        assert all(torch.equal(v, pristine.state_dict()[k]) for k, v in model.state_dict().items())
    model = adapted()
    with disable_adapter(model):
        delete_adapter(model, "default")  # the last adapter: unload
    assert torch.equal(model_output(model, inputs), base_out)
    model = adapted()
    trained_out = model_output(model, inputs)
    with disable_adapter(model):
        merged = merge_and_unload(model)  # an ordinary model at once, as PEFT's
        assert torch.equal(model_output(merged, inputs), trained_out)
    assert torch.equal(model_output(merged, inputs), trained_out)


def test_disable_adapter_nests_and_covers_adapters_added_inside():
    model, inputs = tiny_model("llama"), tiny_inputs("llama")
    base_out = model_output(model, inputs)
    apply_masking(model, MaskingConfig(density=0.3, targets=["q_proj"]), adapter_name="a")
    train_steps(model, inputs)
    with disable_adapter(model):
        with disable_adapter(model):
            pass
        assert torch.equal(model_output(model, inputs), base_out)  # the inner block's end kept it disabled
        apply_masking(model, MaskingConfig(density=0.3, targets=["k_proj"]), adapter_name="b")
        with torch.no_grad():
            for layer in masked_layers(model).values():
                if "b" in layer.adapters:
                    layer.adapters["b"].values.normal_()
        assert torch.equal(model_output(model, inputs), base_out)  # b, added inside, is disabled too
    assert not torch.equal(model_output(model, inputs), base_out)
    assert {layer.active_adapter for layer in masked_layers(model).values()} == {None, "b"}


def test_what_a_mixed_batch_cannot_hold_is_refused():
    model = apply_masking(tiny_model("llama"), MaskingConfig(density=0.3), adapter_name="a").eval()
    with mixed_batch(model, ["a", BASE_ADAPTER]):
        with pytest.raises(MaskingError, match=r"^disable_adapter\(\) inside mixed_batch"):
            with disable_adapter(model):
                pass
        with pytest.raises(MaskingError, match="^adding adapter 'b' inside mixed_batch"):
            apply_masking(model, MaskingConfig(density=0.3), adapter_name="b")
        with pytest.raises(MaskingError, match=r"^add_weighted_adapter\(\.\.\., 'w'\) inside mixed_batch"):
            add_weighted_adapter(model, ["a"], [1.0], "w")
    assert adapter_names(model) == ["a"]


def test_gpt2_qv_blocks_only():
    model = apply_masking(tiny_model("gpt2"), MaskingConfig(density=0.5, seed=0))
    layer = masked_layers(model)["transformer.h.0.attn.c_attn"]
    adapter = layer.adapters["default"]
    assert [b.name for b in adapter.blocks] == ["q", "v"]
    # Conv1D weight is (in, out) = (32, 96); output columns [32, 64) are the k block: untouched.
    out_cols = adapter.indices % 96
    assert ((out_cols < 32) | (out_cols >= 64)).all()
    assert ((out_cols < 32).sum() > 0) and ((out_cols >= 64).sum() > 0)
    alias = apply_masking(tiny_model("gpt2"), MaskingConfig(targets=["q_proj", "v_proj"], density=0.5))
    alias_adapter = masked_layers(alias)["transformer.h.0.attn.c_attn"].adapters["default"]
    assert torch.equal(alias_adapter.indices, adapter.indices)


def test_regex_targets_and_vit_default():
    model = apply_masking(tiny_model("opt"), MaskingConfig(targets=r".*layers\.1\.(fc1|fc2)", density=0.1))
    assert sorted(masked_layers(model)) == ["model.decoder.layers.1.fc1", "model.decoder.layers.1.fc2"]
    vit = tiny_model("vit")
    inputs = tiny_inputs("vit")
    before = model_output(vit, inputs)
    apply_masking(vit, MaskingConfig(density=0.1))
    assert len(masked_layers(vit)) == 4
    assert torch.equal(model_output(vit, inputs), before)
    losses = train_steps(vit, inputs, steps=4)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("kind", ["random_exact", "structured"])
def test_other_mask_kinds_train(kind):
    model = apply_masking(tiny_model("opt"), MaskingConfig(density=0.25, mask_kind=kind))
    losses = train_steps(model, tiny_inputs("opt"))
    assert losses[-1] < losses[0]


def test_custom_mask():
    model = tiny_model("bert")
    masks = {}
    for name, module in model.named_modules():
        if name.endswith(("query", "value")):
            m = torch.zeros_like(module.weight, dtype=torch.bool)
            m[0, :5] = True
            masks[name] = m
    apply_masking(model, MaskingConfig(mask_kind="custom"), custom_masks=masks)
    assert masking_summary(model).trainable == 5 * len(masks)


def test_gradient_checkpointing_matches():
    inputs = tiny_inputs("llama")
    grads = []
    for checkpointing in (False, True):
        model = apply_masking(tiny_model("llama"), MaskingConfig(density=0.2))
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model(**inputs).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_bf16_model_trains_and_merges():
    model = tiny_model("llama").to(torch.bfloat16)
    inputs = tiny_inputs("llama")
    apply_masking(model, MaskingConfig(density=0.2))
    losses = train_steps(model, inputs)
    assert losses[-1] < losses[0]
    values = [p for p in model.parameters() if p.requires_grad]
    assert all(v.dtype == torch.float32 for v in values)  # fp32 master values
    out = model_output(model, inputs)
    assert out.dtype == torch.bfloat16
    assert torch.equal(model_output(merge_and_unload(model), inputs), out)


def test_hf_trainer_needs_no_user_sync(tmp_path):
    """HF Trainer runs the loop; the weight follows the values with no call from the user."""
    import transformers

    model = apply_masking(tiny_model("opt"), MaskingConfig(density=0.2))
    ids = tiny_inputs("opt", batch=8)["input_ids"]
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=4, learning_rate=5e-2,
                                          per_device_train_batch_size=4, report_to=[], save_strategy="no",
                                          logging_strategy="no", use_cpu=True)
    transformers.Trainer(model=model, args=args, train_dataset=data).train()
    layer = next(iter(masked_layers(model).values()))
    adapter = layer.adapters["default"]
    assert adapter.values.detach().abs().sum() > 0
    model_output(model, {"input_ids": ids[:1]})
    assert torch.equal(layer.weight.detach().reshape(-1)[adapter.indices],
                       adapter.base_values + adapter.values.detach())
