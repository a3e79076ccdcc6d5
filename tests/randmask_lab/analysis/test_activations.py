"""input_feature_rms / feature_outliers: the scale of each input feature of a layer, over real tokens only."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import tiny_inputs, tiny_model  # tests/conftest.py (tests/ is on sys.path under pytest)

from randmask import MaskingConfig, apply_masking
from randmask_lab.analysis.activations import feature_outliers, input_feature_rms, matching_modules


def _padded_batch() -> dict[str, torch.Tensor]:
    batch = tiny_inputs("llama", batch=2, seq=10)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0  # the second row's last 4 tokens are padding
    return {**batch, "attention_mask": mask, "labels": batch["input_ids"].masked_fill(mask == 0, -100)}


def test_rms_is_taken_over_the_real_tokens_of_every_batch():
    model = apply_masking(tiny_model("llama"), MaskingConfig(density=0.2, seed=0))
    names = matching_modules(model, ["v_proj"])
    assert names == ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"]
    batch = _padded_batch()
    seen: list[torch.Tensor] = []
    handle = model.get_submodule(names[1]).register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    rms = input_feature_rms(model, [batch, batch], names)
    handle.remove()
    real = seen[0][batch["attention_mask"].bool()]  # (16, 32): the 16 real tokens of the batch
    assert rms[names[1]] == pytest.approx(real.pow(2).mean(0).sqrt(), rel=1e-5)  # two copies: the same mean
    other = {**batch, "input_ids": batch["input_ids"].clone()}
    other["input_ids"][1, 6:] = 5  # padding tokens changed: nothing measured may move
    changed, kept = (input_feature_rms(model, [b], names)[names[1]] for b in (other, batch))
    assert torch.equal(changed, kept)


def test_outliers_rank_features_against_the_median():
    rms = {"m": torch.tensor([1.0, 1.0, 50.0, 2.0, 1.0])}
    out = feature_outliers(rms, top=2, features=[3, 2])["m"]
    assert out["median_rms"] == 1.0
    assert [t["feature"] for t in out["top"]] == [2, 3] and out["top"][0]["x_median"] == 50.0
    assert out["features"]["2"]["rank"] == 0 and out["features"]["3"] == {"rank": 1, "rms": 2.0, "x_median": 2.0}
    with pytest.raises(ValueError, match="outside m's 5 input features"):
        feature_outliers(rms, features=[5])


def test_unknown_module_names_are_a_clear_error():
    with pytest.raises(ValueError, match="pass --modules"):
        matching_modules(tiny_model("llama"), ["value"])


@pytest.mark.parametrize(("suffix", "kind"), [("embed_tokens", "Embedding"), ("self_attn", "LlamaAttention")])
def test_modules_that_are_not_linear_layers_are_refused(suffix, kind):
    """Bug: embed_tokens' input (token ids) was reported as features; self_attn (keyword-only call) an IndexError."""
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=f"\\({kind}\\) is not a linear layer .*pass names of linear layers .*v_proj"):
        matching_modules(model, [suffix])
    masked = apply_masking(tiny_model("llama"), MaskingConfig(targets=["v_proj"], density=0.2, seed=0))
    assert matching_modules(masked, ["v_proj"]) == matching_modules(model, ["v_proj"])  # the wrapper is a layer


def test_a_module_whose_median_feature_is_silent_gets_no_multiple_not_a_division_by_zero():
    from randmask_lab.analysis.runs import activations_markdown

    rms = {"mlp.down_proj": torch.tensor([0.0, 0.0, 0.0, 2.0, 5.0])}  # after a ReLU most features never fire
    summary = {"modules": feature_outliers(rms, top=2, features=[3])}
    row = summary["modules"]["mlp.down_proj"]
    assert row["median_rms"] == 0.0 and [t["x_median"] for t in row["top"]] == [None, None]
    assert row["features"]["3"]["x_median"] is None
    assert "| mlp.down_proj | 0 | 4 (-), 3 (-) | 2, - |" in activations_markdown(summary, [3])
