"""The paper's section-5 theory, simulated: masked over-parameterised linear regression.

Modules: ``linreg`` (the math: data, masks, spectra, bounds, GD, minimum-norm solution),
``experiment`` (sweeps over p and seeds), ``plots`` (one PNG per claim), ``cli``
(``register(subparsers)`` for ``randmask theory`` and ``run_theory(out_dir, ...)``).
Only ``linreg`` is re-exported here, so importing the package does not pull in matplotlib.
"""

from randmask_lab.theory.linreg import (
    GDResult,
    Problem,
    bernoulli_mask,
    bernstein_deviation,
    check_p,
    expected_sq_norm,
    gd_masked,
    gram_eigvals,
    make_problem,
    masked_gram_eigvals,
    min_norm_solution,
    prop53_lower_bound,
    stable_lr,
    theorem51_deviation,
)

__all__ = [
    "GDResult",
    "Problem",
    "bernoulli_mask",
    "bernstein_deviation",
    "check_p",
    "expected_sq_norm",
    "gd_masked",
    "gram_eigvals",
    "make_problem",
    "masked_gram_eigvals",
    "min_norm_solution",
    "prop53_lower_bound",
    "stable_lr",
    "theorem51_deviation",
]
