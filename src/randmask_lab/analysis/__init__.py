"""Loss-landscape analysis of fine-tuned models (paper section 4.3, Figure 4).

Public API (torch only; plots live in ``randmask_lab.analysis.plots``, the CLI in ``.cli``)::

    from randmask_lab.analysis import hessian_top_eigenvalue, distance_from, suggest_lr
    res = hessian_top_eigenvalue(model, batches)
    eigenvector_localization(model, res.vector)   # which tensors and entries carry the top direction
"""

from randmask_lab.analysis.distance import DistanceReport, distance_from, masked_distance
from randmask_lab.analysis.eigen import EigenResult, lanczos, power_iteration
from randmask_lab.analysis.hessian import (
    hessian_top_eigenvalue,
    hessian_top_eigenvalues,
    hessian_top_eigenvalues_with_bounds,
)
from randmask_lab.analysis.hvp import HessianVectorProduct, default_loss, eval_mode, trainable_parameters
from randmask_lab.analysis.localization import eigenvector_localization
from randmask_lab.analysis.suggest_lr import ADAM_CALIBRATION, LR_RANGE_FACTOR, LRSuggestion, calibrate, suggest_lr

__all__ = [
    "ADAM_CALIBRATION",
    "LR_RANGE_FACTOR",
    "DistanceReport",
    "EigenResult",
    "HessianVectorProduct",
    "LRSuggestion",
    "calibrate",
    "default_loss",
    "distance_from",
    "eigenvector_localization",
    "eval_mode",
    "hessian_top_eigenvalue",
    "hessian_top_eigenvalues",
    "hessian_top_eigenvalues_with_bounds",
    "lanczos",
    "masked_distance",
    "power_iteration",
    "suggest_lr",
    "trainable_parameters",
]
