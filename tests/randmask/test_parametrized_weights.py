"""A target whose weight a ``torch.nn.utils.parametrize`` parametrization (``weight_norm``) computes at each access.

Written into in place, the delta went into a tensor recomputed at the next access: the output never changed while
``values`` still got gradients (a run that trained nothing, silently). Such a target now adds its delta beside the
weight; merging it is refused. The parametrization's own modules (``0.parametrizations.weight.0``) are never targets.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from randmask import MaskingConfig, MaskingError, apply_masking, masked_layers, merge_and_unload, unload

CFG = MaskingConfig(targets=["0"], density=0.5, seed=0)


def _net(parametrized: bool) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    if parametrized:
        weight_norm(net[0])  # the same weight, recomputed from (g, v) at every access
    return net


def _trained_once(net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The output with every kept entry's value set to 0.1, and the values' gradient of its sum."""
    values = next(p for p in net.parameters() if p.requires_grad)
    with torch.no_grad():
        values.fill_(0.1)
    out = net(x)
    out.sum().backward()
    return out.detach(), values.grad


def test_a_parametrized_target_adds_its_delta_beside_and_matches_the_plain_weight():
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    parametrized, plain = apply_masking(_net(True), CFG), apply_masking(_net(False), CFG)
    assert list(masked_layers(parametrized)) == ["0"] and masked_layers(parametrized)["0"].delta_path
    assert not masked_layers(plain)["0"].delta_path
    out, grad = _trained_once(parametrized, x)
    plain_out, plain_grad = _trained_once(plain, x)
    torch.testing.assert_close(out, plain_out)  # before: the base's output, as if no value had changed
    torch.testing.assert_close(grad, plain_grad)


def test_merging_a_parametrized_target_is_refused_and_unload_restores_the_base():
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    base = _net(True)(x).detach()
    net = apply_masking(_net(True), CFG)
    out, _ = _trained_once(net, x)
    with pytest.raises(MaskingError, match="0's weight is computed by a parametrization"):
        merge_and_unload(net)
    torch.testing.assert_close(net(x), out, rtol=0, atol=0)
    torch.testing.assert_close(unload(net)(x), base, rtol=0, atol=0)
