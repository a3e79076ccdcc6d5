"""MaskedLayer.sync: the weight holds W0 + values at every forward, whichever way the values changed, and is
written only when stale (a write bumps the weight's version, which a graph that saved it would refuse)."""

from __future__ import annotations

import torch
from torch import nn

from randmask import MaskingConfig, apply_masking, masked_layers


def _masked_linear(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 24, bias=False))
    apply_masking(model, MaskingConfig(targets=["0"], density=0.2, seed=seed))
    layer = next(iter(masked_layers(model).values()))
    return model, layer


def _expected(layer, x):
    adapter = layer.adapters[layer.active_adapter]
    w = layer.weight.detach().clone().view(-1)
    w[adapter.indices] = adapter.base_values + adapter.values.detach()
    return x @ w.view(layer.weight.shape).T


def test_values_edited_in_place_reach_the_next_forward():
    model, layer = _masked_linear()
    x = torch.randn(3, 16)
    with torch.no_grad():
        layer.adapters["default"].values.add_(0.5)  # bumps the version: written without a comparison
    torch.testing.assert_close(model(x), _expected(layer, x), atol=1e-6, rtol=0)


def test_values_edited_through_data_reach_the_next_forward():
    model, layer = _masked_linear()
    x = torch.randn(3, 16)
    model(x)  # synced: the version is recorded
    values = layer.adapters["default"].values
    version = values._version
    values.data.add_(0.5)  # .data: no version bump, so the comparison must catch it
    assert values._version == version
    torch.testing.assert_close(model(x), _expected(layer, x), atol=1e-6, rtol=0)


def test_an_unchanged_adapter_is_not_written_again():
    model, layer = _masked_linear()
    x = torch.randn(3, 16)
    opt = torch.optim.AdamW([layer.adapters["default"].values], lr=1e-2)
    model(x).sum().backward()
    opt.step()
    before = layer.weight._version
    out = model(x)  # the step changed the values: one write
    assert layer.weight._version > before
    written = layer.weight._version
    out2 = model(x)  # a second forward before the backward: nothing to write, the first graph stays valid
    assert layer.weight._version == written
    (out.sum() + out2.sum()).backward()
    torch.testing.assert_close(out, _expected(layer, x), atol=1e-6, rtol=0)


def test_pristine_entries_read_w0_under_the_delta_and_put_it_back():
    torch.manual_seed(0)
    w0 = nn.Linear(16, 24, bias=False).weight.detach().clone()
    model, layer = _masked_linear()
    with torch.no_grad():
        layer.adapters["default"].values.add_(0.5)
    x = torch.randn(3, 16)
    trained = model(x)  # the weight holds W0 + 0.5 at the kept entries
    everywhere = torch.arange(w0.numel())
    torch.testing.assert_close(layer.pristine_entries(everywhere), w0.view(-1), rtol=0, atol=0)
    torch.testing.assert_close(model(x), trained, rtol=0, atol=0)  # the delta is back in the weight
