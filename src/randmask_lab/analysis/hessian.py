"""Top eigenvalue(s) of the training-loss Hessian w.r.t. the trainable parameters (paper Fig. 4a).

"Trainable" is whatever has ``requires_grad``: randmask ``values``, peft LoRA matrices, or every
weight for full fine-tuning, so one function measures every method. The loss is the mean over a
fixed list of batches; the model is put in eval mode (no dropout) for the measurement and each
module's train/eval flag is restored afterwards.

>>> res = hessian_top_eigenvalue(model, batches, tol=1e-3, max_iter=100)   # doctest: +SKIP
>>> res.eigenvalue, res.converged, res.trace                                # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from randmask_lab.analysis.eigen import EigenResult, Which, lanczos_with_bounds, power_iteration
from randmask_lab.analysis.hvp import HessianVectorProduct, LossFn, eval_mode


def hessian_top_eigenvalue(
    model: nn.Module,
    batches: Sequence[Any],
    loss_fn: LossFn | None = None,
    *,
    tol: float = 1e-3,
    max_iter: int = 100,
    seed: int = 0,
    which: Which = "top",
) -> EigenResult:
    """λ_max of the loss Hessian w.r.t. the trainable parameters, by power iteration on exact HVPs.

    Args:
        model: any ``nn.Module``; only parameters with ``requires_grad`` count.
        batches: the fixed batches; the loss is their mean.
        loss_fn: ``loss_fn(model, batch) -> scalar``; default ``model(**batch).loss``.
        tol: stop when the estimate's relative change between iterations is at most this.
        max_iter: products per power-iteration run; hitting it gives ``converged=False`` + a warning.
        seed: seed of the random start vector.
        which: ``"top"`` (largest algebraic eigenvalue, the paper's λ_max; default) or
            ``"magnitude"`` (signed eigenvalue of largest |λ|, the spectral norm up to sign).
            See ``randmask_lab.analysis.eigen`` for how negative eigenvalues are handled.

    Raises ``ValueError`` if the model has nothing trainable or ``batches`` is empty.
    """
    with eval_mode(model):
        hvp = HessianVectorProduct(model, batches, loss_fn)
        return power_iteration(hvp, hvp.dim, tol=tol, max_iter=max_iter, seed=seed, which=which,
                               dtype=hvp.dtype, device=hvp.device)


def hessian_top_eigenvalues(
    model: nn.Module,
    batches: Sequence[Any],
    k: int = 5,
    loss_fn: LossFn | None = None,
    *,
    steps: int | None = None,
    seed: int = 0,
) -> list[float]:
    """The ``k`` largest Hessian eigenvalues (descending) by Lanczos with full reorthogonalisation.

    Costs ``steps`` HVPs (default ``max(2k + 10, 20)``) and stores ``steps`` vectors of the
    trainable size: fine for PEFT, heavy for full fine-tuning of large models.
    """
    return hessian_top_eigenvalues_with_bounds(model, batches, k, loss_fn, steps=steps, seed=seed)[0]


def hessian_top_eigenvalues_with_bounds(model: nn.Module, batches: Sequence[Any], k: int = 5,
                                        loss_fn: LossFn | None = None, *, steps: int | None = None,
                                        seed: int = 0) -> tuple[list[float], list[float]]:
    """:func:`hessian_top_eigenvalues` and each value's Lanczos residual bound (``eigen.lanczos_with_bounds``):
    an eigenvalue of the Hessian lies within it, so a large one says the value needs more ``steps``."""
    with eval_mode(model):
        hvp = HessianVectorProduct(model, batches, loss_fn)
        return lanczos_with_bounds(hvp, hvp.dim, k, steps=steps, seed=seed, dtype=hvp.dtype, device=hvp.device)
