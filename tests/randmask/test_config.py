"""Bad input gets a clear error that names the problem and the fix."""

from __future__ import annotations

import math

import pytest
import torch
from tests.conftest import tiny_model

from randmask import MaskingConfig, MaskingError, apply_masking


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, math.nan, math.inf])
def test_bad_density(density):
    with pytest.raises(MaskingError, match="density"):
        MaskingConfig(density=density)


@pytest.mark.parametrize("ratio", [0.0, -1e-3, 2.0, math.nan])
def test_bad_ratio(ratio):
    with pytest.raises(MaskingError, match="trainable_ratio"):
        MaskingConfig(trainable_ratio=ratio)


def test_budget_needs_exactly_one_of_ratio_or_density():
    with pytest.raises(MaskingError, match="exactly one budget"):
        MaskingConfig()
    with pytest.raises(MaskingError, match="exactly one budget"):
        MaskingConfig(trainable_ratio=1e-3, density=0.1)


def test_ratio_too_small_or_too_large_names_the_numbers():
    with pytest.raises(MaskingError, match=r"entries per matrix.*trainable_ratio >= "):
        apply_masking(tiny_model("opt"), MaskingConfig(trainable_ratio=1e-6))
    with pytest.raises(MaskingError, match="Lower trainable_ratio"):
        apply_masking(tiny_model("opt"), MaskingConfig(trainable_ratio=0.9))


def test_unknown_target_lists_candidates():
    with pytest.raises(MaskingError, match=r"matches no module.*q_proj"):
        apply_masking(tiny_model("opt"), MaskingConfig(targets=["q_projj"], density=0.1))
    with pytest.raises(MaskingError, match="match no module"):
        apply_masking(tiny_model("opt"), MaskingConfig(targets=r"nothing\..*", density=0.1))


def test_non_linear_target():
    with pytest.raises(MaskingError, match="is a Embedding"):
        apply_masking(tiny_model("opt"), MaskingConfig(targets=["embed_tokens"], density=0.1))


def test_unknown_architecture_needs_targets():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(MaskingError, match="no target table"):
        apply_masking(model, MaskingConfig(density=0.5))
    apply_masking(model, MaskingConfig(targets=["0"], density=0.5))


def test_applying_twice():
    model = apply_masking(tiny_model("opt"), MaskingConfig(density=0.1))
    with pytest.raises(MaskingError, match="already applied"):
        apply_masking(model, MaskingConfig(density=0.1))


def test_unknown_kind_and_custom_without_masks():
    with pytest.raises(MaskingError, match="unknown mask_kind"):
        apply_masking(tiny_model("opt"), MaskingConfig(density=0.1, mask_kind="magic"))
    with pytest.raises(MaskingError, match="custom_masks"):
        apply_masking(tiny_model("opt"), MaskingConfig(mask_kind="custom"))


def test_zero_entry_draw_is_an_error():
    # 32x32 at p=1e-4: expected 0.1 entries, so the Bernoulli draw is almost surely empty.
    with pytest.raises(MaskingError, match="drew zero entries"):
        apply_masking(tiny_model("opt"), MaskingConfig(density=1e-4))


def test_config_dict_round_trip_and_unknown_fields():
    cfg = MaskingConfig(targets=["q_proj"], trainable_ratio=1e-4, seed=3)
    assert MaskingConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(MaskingError, match="unknown MaskingConfig fields"):
        MaskingConfig.from_dict({**cfg.to_dict(), "rank": 8})


def test_exclude_is_saved_only_when_set() -> None:
    plain = MaskingConfig(density=0.1)
    assert "exclude" not in plain.to_dict()  # files of adapters without it stay as they were
    config = MaskingConfig(density=0.1, targets=["q_proj", "v_proj"], exclude=("layers.0.self_attn.q_proj",))
    assert config.to_dict()["exclude"] == ["layers.0.self_attn.q_proj"]
    assert MaskingConfig.from_dict(config.to_dict()) == config
