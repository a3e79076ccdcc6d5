"""Masked models under ``torch.inference_mode``: tensors made there have no version counter, and reading one
(``t._version``) is a RuntimeError, so every version-keyed cache must do without it for them."""

from __future__ import annotations

import torch
from torch import nn

from randmask import MaskingConfig, apply_masking, mixed_batch, set_adapter


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 4))


def _train_a_little(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    return model


def test_autocast_forward_under_inference_mode():
    """The usual serving block, ``inference_mode`` + ``autocast``: the op's autocast-cast cache read the input's
    version counter ("Inference tensors do not track version counter"), on every in-place masked layer."""
    model = _train_a_little(apply_masking(_model(), MaskingConfig(targets=["0", "2"], density=0.3)))
    x = torch.randn(3, 12)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(x)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        x = x.clone()  # an inference tensor, as every hidden state made in the block is
        got = model(x)
        again = model(x)
    assert torch.equal(got, expected) and torch.equal(again, expected)


def test_masking_applied_under_inference_mode_serves_there():
    """Adapters added inside ``inference_mode`` (a server that loads them lazily) have inference ``values``: the
    layer's stale-weight check read their version counter, so ``apply_masking`` itself failed; a mixed batch's
    values cache did too. Both now compare or restack instead, and an in-place edit of the values still shows."""
    x = torch.randn(3, 12)
    with torch.inference_mode():
        model = apply_masking(_model(), MaskingConfig(targets=["0", "2"], density=0.3))
        apply_masking(model, MaskingConfig(targets=["0", "2"], density=0.3, seed=1), adapter_name="b")
        set_adapter(model, "default")
        model.eval()
        base = model[2].base_layer(model[1](model[0].base_layer(x)))  # W0 (the values are zero)
        assert torch.equal(model(x), base)
        for p in model.parameters():
            p.add_(0.5)  # values and biases: an in-place edit no version counter records
        plain = model(x)
        assert not torch.equal(plain, base)
        with mixed_batch(model, ["default", "__base__", "b"]):
            rows = model(x)
        with mixed_batch(model, ["default", "__base__", "b"]):
            model[0].adapters["default"].values.mul_(2.0)  # the cache must not serve the old values
            rows_after = model(x)
    torch.testing.assert_close(rows[0], plain[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(rows_after[0], rows[0])


def test_the_compiled_path_builds_a_pattern_for_indices_made_under_inference_mode():
    """The custom op's pattern cache keys on the indices' version counter: indices drawn under ``inference_mode``
    have none, and reading it was a RuntimeError; their pattern is built anew, and still refuses bad indices."""
    import pytest

    from randmask.compiled import pattern_for

    with torch.inference_mode():
        indices = torch.tensor([0, 5, 11], dtype=torch.int64)
        first, second = pattern_for(indices, 3, 4, False), pattern_for(indices, 3, 4, False)
        assert torch.equal(first.indices, indices) and torch.equal(second.indices, indices)
        indices[2] = 12  # past the 3x4 matrix: an edit no version counter records is still caught
        with pytest.raises(ValueError, match="indices must lie in"):
            pattern_for(indices, 3, 4, False)
