"""Sweeps of the section-5 model over mask densities p and seeds: the numbers behind the three plots.

One record per (p, seed) holds the measurements for all three claims:
(a) eigenvalue ratios lambda_i(X M X^T) / (p lambda_i(X X^T)) and the deviation vs Theorem 5.1,
(b) the measured critical learning rate of GD vs 2 / lambda_1(X M X^T) (Proposition 5.2),
(c) the norm of GD's limit vs the lower bound of Proposition 5.3.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from randmask_lab.theory.linreg import (
    Array,
    bernoulli_mask,
    bernstein_deviation,
    check_delta,
    check_p,
    check_shape,
    check_sigma,
    expected_sq_norm,
    gd_masked,
    gram_eigvals,
    make_problem,
    masked_gram_eigvals,
    min_norm_solution,
    prop53_lower_bound,
    theorem51_deviation,
)


def _blows_up(XS: Array, target: Array, lrs: Array, steps: int) -> np.ndarray:
    """Run GD from Delta = 0 for every learning rate in ``lrs`` at once; True where it blew up.

    GD's residual r_t = X_S w_t - target obeys r_{t+1} = r_t - lr X_S X_S^T r_t exactly, so this
    iterates GD itself, in residual space: O(n^2) per step and rate instead of O(n k).
    Why the test is clean: below 2/lambda_1 every eigen-mode of the residual contracts, so
    ||r_t|| <= ||r_0|| for all t; above it the top mode grows like |1 - lr lambda_1|^t.
    """
    G = XS @ XS.T  # (n, n)
    R = np.repeat(-target[:, None], lrs.size, axis=1)  # residuals at Delta = 0, (n, L)
    with np.errstate(over="ignore", invalid="ignore"):
        for _ in range(steps):
            R = R - lrs * (G @ R)
        norms = np.linalg.norm(R, axis=0)
    return ~np.isfinite(norms) | (norms > 1.5 * np.linalg.norm(target))


def measure_critical_lr(
    X: Array, target: Array, mask: np.ndarray, steps: int = 2000, rounds: int = 4, points: int = 11
) -> float:
    """Empirical stability edge of GD on (1): the midpoint of the final bracket [stable, unstable].

    Independent of any eigen-decomposition: the first grid is geometric over [s/2, 2 n s] with
    s = 2 / ||X_S||_F^2, which contains 2/lambda_1 because ||X_S||_F^2 / n <= lambda_1 <= ||X_S||_F^2;
    each later round splits the bracket into ``points`` learning rates. Resolution is limited by
    ``steps``: a rate (1 + eps) above the edge needs about ln(2 sqrt(n)) / (2 eps) steps to show.
    """
    XS = X[:, mask]
    s = 2.0 / float(np.sum(XS * XS))
    grid = np.geomspace(0.5 * s, 2.0 * X.shape[0] * s, 4 * points)
    for _ in range(rounds):
        bad = _blows_up(XS, target, grid, steps)
        if not bad.any() or bad[0]:
            raise RuntimeError("critical learning rate not bracketed; increase steps")
        j = int(np.argmax(bad))  # first unstable rate
        lo, hi = grid[j - 1], grid[j]
        grid = np.linspace(lo, hi, points)
    return 0.5 * (lo + hi)


def _record(problem: Any, lam: Array, p: float, seed: int, delta: float, gd_steps: int, draws: int) -> dict:
    X, n, d = problem.X, problem.X.shape[0], problem.X.shape[1]
    mask = bernoulli_mask(d, p, seed)
    eig_m = masked_gram_eigvals(X, mask)
    lr_theory = 2.0 / eig_m[0]
    target = problem.target
    ok = gd_masked(X, problem.y, mask, 0.9 * lr_theory, steps=50 * gd_steps, w0=problem.w0)
    bad = gd_masked(X, problem.y, mask, 1.1 * lr_theory, steps=gd_steps, w0=problem.w0)
    closed = min_norm_solution(X, problem.y, mask, w0=problem.w0)
    # Monte Carlo over fresh noise draws (X, w*, mask fixed), as in Proposition 5.3's expectation
    rng = np.random.default_rng([seed, 2])
    targets = (X @ problem.w_star)[:, None] + problem.sigma * rng.standard_normal((n, draws))  # (n, draws)
    sq_norms = np.sum((np.linalg.pinv(X[:, mask]) @ targets) ** 2, axis=0)
    return {
        "p": p,
        "seed": seed,
        "kept": int(mask.sum()),
        # (a) Theorem 5.1
        "eig_ratio": (eig_m / (p * lam)).tolist(),
        "deviation": float(np.max(np.abs(eig_m - p * lam))),
        "thm51_bound": theorem51_deviation(n, d, delta, float(np.abs(X).max())),
        "bernstein_bound": bernstein_deviation(X, p, delta),
        "p_lambda_1": float(p * lam[0]),
        # (b) Proposition 5.2
        "lambda_max_masked": float(eig_m[0]),
        "lr_theory": float(lr_theory),
        "lr_measured": measure_critical_lr(X, target, mask, steps=gd_steps),
        "gd_converged_at_0.9": ok.converged,
        "gd_diverged_at_1.1": bad.diverged,
        "loss_curve_0.9": ok.losses[: gd_steps + 1].tolist(),
        "loss_curve_1.1": bad.losses.tolist(),
        "gd_vs_min_norm_rel_err": float(np.linalg.norm(ok.delta - closed) / np.linalg.norm(closed)),
        # (c) Proposition 5.3
        "norm_gd": float(np.linalg.norm(ok.delta)),
        "sq_norm_mc": float(sq_norms.mean()),
        "sq_norm_exact": expected_sq_norm(X, mask, problem.w_star, problem.sigma),
        "sq_norm_bound": prop53_lower_bound(X, mask, problem.w_star, problem.sigma),
    }


def check_sweep(n: int, d: int, p_values: Sequence[float], seeds: Sequence[int], sigma: float,
                delta: float) -> list[float]:
    """Raise ``ValueError`` naming the first setting ``run_sweep`` cannot run, before any work; the checked p's."""
    ps = [check_p(p) for p in p_values]
    check_shape(n, d)
    if not seeds:
        raise ValueError("need at least one seed")
    if any(seed < 0 for seed in seeds):
        raise ValueError(f"seeds must be non-negative integers, got {list(seeds)}")
    check_sigma(sigma)
    check_delta(delta)
    if min(ps) * d < 2 * n:
        raise ValueError(
            f"p={min(ps)} keeps about {min(ps) * d:.0f} of d={d} coordinates, fewer than 2n={2 * n}: "
            "X M X^T would be (near) singular and Proposition 5.3 does not apply; raise p or d, or lower n"
        )
    return ps


def run_sweep(
    n: int,
    d: int,
    p_values: Sequence[float],
    seeds: Sequence[int],
    sigma: float = 0.5,
    delta: float = 0.05,
    gd_steps: int = 2000,
    noise_draws: int = 200,
) -> list[dict]:
    """One record per (p, seed); each seed fixes X, w0, w*, the noise and the (nested) masks."""
    ps = check_sweep(n, d, p_values, seeds, sigma, delta)
    records = []
    for seed in seeds:
        problem = make_problem(n, d, sigma, seed)
        lam = gram_eigvals(problem.X)
        records += [_record(problem, lam, p, seed, delta, gd_steps, noise_draws) for p in ps]
    return records


def p_key(p: float) -> str:
    """The summary's key for ``p``: ``f"{p:g}"`` ('0.05', '1'), the form the committed results use, unless
    that rounds p away (``:g`` keeps 6 significant digits, so 0.5000001 -> '0.5', which would overwrite
    0.5's row); then ``repr(p)``, which round-trips. Every key parses back to its own p, so distinct p's
    always get distinct keys."""
    short = f"{p:g}"
    return short if float(short) == p else repr(p)


def _prop53_verdict(rs: list[dict]) -> dict:
    """Proposition 5.3's check over the seeds of one p.

    The verdict uses ``sq_norm_exact``, the expectation the proposition bounds (>= the bound by
    construction); the Monte Carlo mean over ``noise_draws`` scatters around it and with few draws
    falls below the bound by chance, so its ratio is reported beside, named as the estimate it is.
    """
    exact_ratio = np.array([r["sq_norm_exact"] / r["sq_norm_bound"] for r in rs])
    mc_ratio = np.array([r["sq_norm_mc"] / r["sq_norm_bound"] for r in rs])
    return {
        "sq_norm_exact_over_bound_min": float(exact_ratio.min()),
        "sq_norm_mc_over_bound_min": float(mc_ratio.min()),
        "bound_holds_all": bool(np.all(exact_ratio >= 1.0)),
    }


def summarise(records: list[dict]) -> dict[str, dict]:
    """Per-p aggregates over seeds (keys are p as strings, for JSON: see ``p_key``)."""
    out: dict[str, dict] = {}
    for p in sorted({r["p"] for r in records}):
        rs = [r for r in records if r["p"] == p]
        ratios = np.concatenate([r["eig_ratio"] for r in rs])
        lr_ratio = np.array([r["lr_measured"] / r["lr_theory"] for r in rs])
        mean = lambda key: float(np.mean([r[key] for r in rs]))  # noqa: B023 (used in this loop only)
        out[p_key(p)] = {
            "seeds": len(rs),
            "kept_mean": mean("kept"),
            "eig_ratio": {
                "mean": float(ratios.mean()),
                "min": float(ratios.min()),
                "max": float(ratios.max()),
            },
            "top_eig_ratio_mean": float(np.mean([r["eig_ratio"][0] for r in rs])),
            "deviation_max": float(max(r["deviation"] for r in rs)),
            "thm51_bound": float(rs[0]["thm51_bound"]),
            "bernstein_bound_mean": mean("bernstein_bound"),
            "p_lambda_1_mean": mean("p_lambda_1"),
            "lambda_max_masked_mean": mean("lambda_max_masked"),
            "lr_theory_mean": mean("lr_theory"),
            "lr_measured_mean": mean("lr_measured"),
            "lr_measured_over_theory": {"min": float(lr_ratio.min()), "max": float(lr_ratio.max())},
            "gd_converged_at_0.9_all": all(r["gd_converged_at_0.9"] for r in rs),
            "gd_diverged_at_1.1_all": all(r["gd_diverged_at_1.1"] for r in rs),
            "gd_vs_min_norm_rel_err_max": float(max(r["gd_vs_min_norm_rel_err"] for r in rs)),
            "norm_gd_mean": mean("norm_gd"),
            "sq_norm_mc_mean": mean("sq_norm_mc"),
            "sq_norm_exact_mean": mean("sq_norm_exact"),
            "sq_norm_bound_mean": mean("sq_norm_bound"),
            **_prop53_verdict(rs),
        }
    return out


def fmt_table(summary: dict[str, dict]) -> str:
    """A short fixed-width table of the key numbers, one row per p."""
    head = (
        f"{'p':>6} {'kept':>6} {'ratio mean [min,max]':>24} {'dev/thm5.1':>10} "
        f"{'lr meas/2/lmax':>15} {'E|D|^2':>9} {'bound':>9} {'GD=minnorm':>10}"
    )
    rows = [head, "-" * len(head)]
    for p, s in summary.items():
        er, lr = s["eig_ratio"], s["lr_measured_over_theory"]
        rows.append(
            f"{p:>6} {s['kept_mean']:>6.0f} {er['mean']:>8.3f} [{er['min']:.3f},{er['max']:.3f}] "
            f"{s['deviation_max'] / s['thm51_bound']:>10.4f} {lr['min']:>7.4f}-{lr['max']:.4f} "
            f"{s['sq_norm_mc_mean']:>9.3f} {s['sq_norm_bound_mean']:>9.3f} "
            f"{'yes' if s['gd_vs_min_norm_rel_err_max'] < 1e-6 else 'NO':>10}"
        )
    return "\n".join(rows)
