"""Distance from the pretrained weights: randmask values vs a state-dict comparison."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from tests.conftest import tiny_model  # tests/conftest.py (tests/ is on sys.path under pytest)

from randmask import MaskingConfig, apply_masking, masked_layers
from randmask_lab.analysis import distance_from, masked_distance


@pytest.fixture
def trained():
    """A tiny OPT with randmask values set to random deltas, and its pretrained state dict."""
    model = tiny_model("opt")
    reference = copy.deepcopy(model.state_dict())
    apply_masking(model, MaskingConfig(density=0.1, seed=0))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in masked_layers(model).values():
            values = layer.adapters["default"].values
            values.copy_(torch.randn(values.shape, generator=gen))
    return model, reference


def test_masked_distance_is_the_norm_of_values(trained):
    model, _ = trained
    report = masked_distance(model)
    layers = masked_layers(model)
    assert set(report.per_matrix) == {f"{n}.weight" for n in layers}
    for name, layer in layers.items():
        assert report.per_matrix[f"{name}.weight"] == pytest.approx(
            float(layer.adapters["default"].values.detach().norm()), rel=1e-6)
    all_values = torch.cat([m.adapters["default"].values.detach() for m in layers.values()])
    assert report.total == pytest.approx(float(all_values.norm()), rel=1e-6)


def test_distance_from_pretrained_state_dict_matches(trained):
    model, reference = trained
    by_values = masked_distance(model)
    # No forward since the values changed: distance_from must sync the weights itself.
    by_weights = distance_from(model, reference)
    assert set(by_weights.per_matrix) == set(by_values.per_matrix)  # unchanged weights skipped
    for key, dist in by_values.per_matrix.items():
        assert by_weights.per_matrix[key] == pytest.approx(dist, rel=1e-5)
    assert by_weights.total == pytest.approx(by_values.total, rel=1e-5)
    assert by_weights.unmatched == []


def test_reference_taken_after_masking_does_not_double_count(trained):
    model, _ = trained
    fresh = tiny_model("opt")
    apply_masking(fresh, MaskingConfig(density=0.1, seed=0))
    report = distance_from(model, fresh.state_dict())  # keys with .base_layer and values
    assert report.total == pytest.approx(masked_distance(model).total, rel=1e-5)


def test_full_fine_tuning_and_all_entries():
    model = tiny_model("llama")
    reference = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        model.lm_head.weight.add_(0.5)  # tied or not, one tensor moves by 0.5 everywhere
    report = distance_from(model, reference, skip_unchanged=False)
    assert len(report.per_matrix) == len(list(model.named_parameters()))
    assert report.per_matrix["lm_head.weight"] == pytest.approx(0.5 * math.sqrt(model.lm_head.weight.numel()))


def test_errors_say_what_to_do():
    model = tiny_model("opt")
    with pytest.raises(ValueError, match="distance_from"):
        masked_distance(model)
    bad = {k: v[..., :1] for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="same pretrained model"):
        distance_from(model, bad)


def test_a_bare_backbone_checkpoint_serves_a_task_model():
    import transformers as tf

    config = tf.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32, num_labels=2)
    torch.manual_seed(0)
    classifier = tf.BertForSequenceClassification(config)
    backbone = {k.removeprefix("bert."): v.clone() for k, v in classifier.state_dict().items() if k.startswith("bert.")}
    with torch.no_grad():
        classifier.bert.encoder.layer[0].attention.self.query.weight.add_(1.0)
    report = distance_from(classifier, backbone)
    key = "encoder.layer.0.attention.self.query.weight"
    assert list(report.per_matrix) == [key] and report.per_matrix[key] == pytest.approx(16.0)


def test_trainable_only_leaves_out_frozen_parameters_but_keeps_masked_weights(trained):
    model, reference = trained
    with torch.no_grad():
        model.model.decoder.final_layer_norm.weight.add_(1.0)  # moved, but frozen by apply_masking
    everything = distance_from(model, reference)
    trained_only = distance_from(model, reference, trainable_only=True)
    assert "model.decoder.final_layer_norm.weight" in everything.per_matrix
    assert trained_only.per_matrix.keys() == masked_distance(model).per_matrix.keys()
    assert trained_only.total == pytest.approx(masked_distance(model).total)


def test_a_lora_delta_is_merged_and_measured_as_scale_b_a():
    peft = pytest.importorskip("peft")
    from randmask_lab.analysis.distance import merge_peft_delta

    base = tiny_model("llama")
    reference = copy.deepcopy(base.state_dict())
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    expected = {}
    for name, module in model.named_modules():
        if getattr(module, "lora_A", None):
            torch.nn.init.normal_(module.lora_B["default"].weight)  # B starts at zero: give it a delta
            delta = module.scaling["default"] * module.lora_B["default"].weight @ module.lora_A["default"].weight
            expected[name.removeprefix("base_model.model.") + ".weight"] = float(delta.double().norm())
    merged, names = merge_peft_delta(model)
    assert names == set(expected)
    report = distance_from(merged, reference, trainable_only=True, also=names)
    assert report.per_matrix.keys() == expected.keys()
    for name, value in expected.items():
        assert report.per_matrix[name] == pytest.approx(value, rel=1e-5)
    plain, none = merge_peft_delta(tiny_model("llama"))  # not a peft model: unchanged
    assert none == set() and not hasattr(plain, "peft_config")


def test_a_bias_the_method_added_counts_from_zero():
    """Bug: BitFit on a bias-free model (Llama) was refused with "is it the right reference?" although the reference
    was right: the pretrained layer has no bias, i.e. a zero one, so the added bias's norm is the distance."""
    model = tiny_model("llama")
    reference = copy.deepcopy(model.state_dict())
    for p in model.parameters():
        p.requires_grad_(False)
    q = model.model.layers[0].self_attn.q_proj
    q.bias = torch.nn.Parameter(torch.full((q.out_features,), 0.5))  # BitFit's added bias, after training
    report = distance_from(model, reference, trainable_only=True)
    assert report.per_matrix == {"model.layers.0.self_attn.q_proj.bias": pytest.approx(0.5 * q.out_features ** 0.5)}
    assert report.unmatched == []


def test_parameters_with_no_pretrained_value_are_named_as_such():
    """An adapter/prefix method's own parameters: the message says why there is no distance, not "wrong reference"."""
    model = tiny_model("llama")
    reference = copy.deepcopy(model.state_dict())
    for p in model.parameters():
        p.requires_grad_(False)
    model.prefix = torch.nn.Parameter(torch.ones(4))
    with pytest.raises(ValueError, match=r"\['prefix'\].*have no pretrained value to measure from"):
        distance_from(model, reference, trainable_only=True)
