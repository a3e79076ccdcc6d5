"""The learning-rate suggestion from λ_max."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from randmask_lab.analysis import ADAM_CALIBRATION, suggest_lr


def _net_and_batches():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    return net, [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(2)]


def _ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def test_finite_and_ordered():
    net, batches = _net_and_batches()
    s = suggest_lr(net, batches, _ce, tol=1e-4, max_iter=500)
    numbers = [s.lambda_max, s.gd_bound, s.grad_rms, s.adam_lr, s.adam_lr_low, s.adam_lr_high]
    assert all(math.isfinite(x) and x > 0 for x in numbers)
    assert s.adam_lr_low < s.adam_lr < s.adam_lr_high
    assert s.gd_bound == pytest.approx(2 / s.lambda_max)
    assert s.adam_lr == pytest.approx(ADAM_CALIBRATION * s.grad_rms * s.gd_bound)
    assert s.n_trainable == sum(p.numel() for p in net.parameters()) and s.converged


def test_grad_rms_is_the_per_batch_gradient_scale():
    net, batches = _net_and_batches()
    sq = 0.0
    for b in batches:
        grads = torch.autograd.grad(_ce(net, b), list(net.parameters()))
        sq += sum(float(g.pow(2).sum()) for g in grads)
    s = suggest_lr(net, batches, _ce, max_iter=50)
    assert s.grad_rms == pytest.approx(math.sqrt(sq / (2 * s.n_trainable)), rel=1e-5)


def test_calibration_scales_linearly_and_is_validated():
    net, batches = _net_and_batches()
    a = suggest_lr(net, batches, _ce, max_iter=50)
    b = suggest_lr(net, batches, _ce, max_iter=50, calibration=10.0)
    assert b.adam_lr == pytest.approx(10 * a.adam_lr) and b.calibration == 10.0
    with pytest.raises(ValueError, match="calibration"):
        suggest_lr(net, batches, _ce, calibration=0.0)


def test_no_positive_curvature_is_a_clear_error():
    w = nn.Parameter(torch.ones(3))
    model = nn.Module()
    model.w = w
    concave = [None]  # loss = -½||w||²: H = -I, top eigenvalue -1
    with pytest.raises(ValueError, match="no positive curvature"):
        suggest_lr(model, concave, lambda m, _: -0.5 * (m.w ** 2).sum(), max_iter=20)


def test_calibrate_is_the_geometric_mean_of_best_over_suggested():
    from randmask_lab.analysis.suggest_lr import calibrate

    factor, spread = calibrate([1e-3, 1e-2], [1e-2, 1e-2])  # own factors 10 and 1
    assert factor == pytest.approx(10**0.5) and spread == pytest.approx(10**0.5)
    assert calibrate([2e-3], [6e-3]) == pytest.approx((3.0, 1.0))
    with pytest.raises(ValueError, match="as many"):
        calibrate([1e-3], [])
