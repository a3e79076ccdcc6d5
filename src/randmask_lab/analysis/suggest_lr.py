"""Suggest an Adam learning rate from the loss Hessian's top eigenvalue (paper section 4.3).

Gradient descent on a loss with top curvature λ_max is stable only for lr < 2/λ_max (the
paper's argument for why sparse masks, whose λ_max is small, tolerate large learning rates).
Adam does not take steps of size lr·g, so the bound needs a translation; ours is below and is
deliberately simple. It is a starting point for a sweep, not a replacement for one.

Derivation (the default ``ADAM_CALIBRATION``): Adam divides each gradient coordinate by
√v̂ ≈ the RMS of that coordinate's (mini-batch) gradient. If that scale is about the same for
every coordinate, g_rms, Adam is gradient descent with step lr/g_rms (ignoring momentum), so the
same stability bound gives lr/g_rms < 2/λ_max, i.e.

    lr_adam ≈ ADAM_CALIBRATION · g_rms · 2/λ_max.

Equivalently: an Adam step moves every coordinate by about lr, a GD step by η·|g_i|; equating
the step lengths at the GD-stable η = 2/λ_max gives the same formula. ``ADAM_CALIBRATION`` = 1
claims no correction beyond this. Known corrections pull both ways: momentum widens Adam's
stable region (its edge is at (1+β1)/(1-β1) = 19 times this value for β1 = 0.9, Cohen et al.
2022, "Adaptive gradient methods at the edge of stability"), and mini-batch noise inflates √v̂;
uneven per-coordinate gradient scales can shrink it. So the factor MUST be calibrated on real
sweeps: set it to (best swept lr) / (suggested lr at factor 1), averaged over tasks and budgets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from randmask_lab.analysis.eigen import power_iteration
from randmask_lab.analysis.hvp import HessianVectorProduct, LossFn, eval_mode

ADAM_CALIBRATION = 1.0
"""lr_adam / (g_rms · 2/λ_max). Fitted with ``calibrate`` (``randmask calibrate-lr``) on MiniLM-L6 + head, RTE
(experiments/analysis_minilm_rte.sh, 4 cells): 1.0, but single cells deviate by up to 44x (README), so the
suggestion orders budgets correctly and starts a sweep; it does not replace one."""

LR_RANGE_FACTOR = math.sqrt(10.0)
"""The suggested range is [lr / f, lr · f]: half a decade either side, a 3-point log grid."""


@dataclass
class LRSuggestion:
    """An Adam learning-rate suggestion and the numbers it came from.

    Attributes:
        lambda_max: top eigenvalue of the loss Hessian w.r.t. the trainable parameters.
        gd_bound: 2 / lambda_max, gradient descent's largest stable step.
        grad_rms: RMS over trainable coordinates and batches of the per-batch gradient (≈ Adam's √v̂).
        adam_lr: calibration · grad_rms · gd_bound.
        adam_lr_low, adam_lr_high: adam_lr / range_factor and adam_lr · range_factor.
        calibration: the factor used.
        n_trainable: number of trainable scalars (the budget actually measured).
        converged: whether the power iteration met its tolerance.
        iterations: Hessian-vector products used.
    """

    lambda_max: float
    gd_bound: float
    grad_rms: float
    adam_lr: float
    adam_lr_low: float
    adam_lr_high: float
    calibration: float
    n_trainable: int
    converged: bool
    iterations: int

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return asdict(self)


def suggest_lr(
    model: nn.Module,
    batches: Sequence[Any],
    loss_fn: LossFn | None = None,
    *,
    calibration: float = ADAM_CALIBRATION,
    range_factor: float = LR_RANGE_FACTOR,
    tol: float = 1e-3,
    max_iter: int = 100,
    seed: int = 0,
) -> LRSuggestion:
    """Measure λ_max (top eigenvalue) and g_rms on ``batches`` and suggest an Adam learning rate.

    The model should already carry its fine-tuning method and budget (what is trainable is what is
    measured). Raises ``ValueError`` when λ_max <= 0 or the gradient is zero: the bound is then
    vacuous at this point; measure at the pretrained weights or on more batches.
    """
    if calibration <= 0 or range_factor < 1:
        raise ValueError(f"need calibration > 0 and range_factor >= 1, got {calibration}, {range_factor}.")
    with eval_mode(model):
        hvp = HessianVectorProduct(model, batches, loss_fn)
        eig = power_iteration(hvp, hvp.dim, tol=tol, max_iter=max_iter, seed=seed, which="top",
                              dtype=hvp.dtype, device=hvp.device)
        # Mean over batches of ||g_b||² / n: the per-coordinate second moment Adam's v̂ tracks.
        grad_rms = math.sqrt(sum(hvp.gradient_sq_norms()) / (len(hvp.batches) * hvp.dim))
    if eig.eigenvalue <= 0:
        raise ValueError(f"the top Hessian eigenvalue is {eig.eigenvalue:.3g} <= 0 (no positive curvature), "
                         "so 2/λ_max bounds nothing; measure at the pretrained weights or on more batches.")
    if grad_rms == 0:
        raise ValueError("the gradient is exactly zero on these batches; use other batches to set the scale.")
    gd_bound = 2.0 / eig.eigenvalue
    lr = calibration * grad_rms * gd_bound
    return LRSuggestion(eig.eigenvalue, gd_bound, grad_rms, lr, lr / range_factor, lr * range_factor,
                        calibration, hvp.dim, eig.converged, eig.iterations)


def calibrate(suggested: Sequence[float], best: Sequence[float]) -> tuple[float, float]:
    """(factor, spread) mapping suggestions made at calibration 1 to the best swept LRs.

    factor: geometric mean of best / suggested over the pairs (the ``ADAM_CALIBRATION`` to use);
    spread: the largest ratio between any pair's own factor and ``factor`` (1 = one factor fits all
    pairs exactly; a grid step of √10 either side is the suggested range).
    """
    if len(suggested) != len(best) or not suggested:
        raise ValueError(f"need as many suggestions as best LRs (and at least one), got {len(suggested)}, {len(best)}")
    if min(*suggested, *best) <= 0:
        raise ValueError("learning rates must be > 0")
    logs = [math.log(b / s) for s, b in zip(suggested, best)]
    mean = sum(logs) / len(logs)
    return math.exp(mean), math.exp(max(abs(x - mean) for x in logs))
