"""One PNG per claim of section 5, drawn from ``experiment.run_sweep`` records.

Uses ``matplotlib.figure.Figure`` directly (Agg canvas, no pyplot), so no global backend is touched.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from randmask_lab.fs import save_figure
from randmask_lab.theory.experiment import p_key


def _by_p(records: list[dict], key: str) -> tuple[np.ndarray, list[np.ndarray]]:
    ps = np.array(sorted({r["p"] for r in records}))
    return ps, [np.array([r[key] for r in records if r["p"] == p]) for p in ps]


def _seeds(records: list[dict]) -> list[int]:
    return sorted({r["seed"] for r in records})


def _series(records: list[dict], seed: int, key: str) -> tuple[np.ndarray, np.ndarray]:
    rs = sorted((r for r in records if r["seed"] == seed), key=lambda r: r["p"])
    return np.array([r["p"] for r in rs]), np.array([r[key] for r in rs])


def _finish(fig: Figure, path: Path, title: str, caption: str) -> Path:
    fig.suptitle(title, fontsize=12)
    fig.text(0.5, 0.01, caption, ha="center", va="bottom", fontsize=8, color="0.3", wrap=True)
    fig.tight_layout(rect=(0, 0.07, 1, 0.95))
    return save_figure(fig, path)


def plot_eigen_concentration(records: list[dict], path: Path, n: int, d: int, delta: float) -> Path:
    """(a) lambda_i(X M X^T) / (p lambda_i(X X^T)) over p, and max_i deviation vs Theorem 5.1."""
    fig = Figure(figsize=(11, 4.6))
    ax1, ax2 = fig.subplots(1, 2)
    _eigen_ratio_panel(ax1, records)
    _eigen_deviation_panel(ax2, records, delta)
    return _finish(
        fig,
        path,
        f"(a) Eigenvalue concentration of the masked Gram matrix  (n={n}, d={d})",
        "At p = 1 the mask keeps everything and the deviation is exactly 0 (not drawn on the log "
        "axis). The paper's bound is loose at these sizes; it becomes sharp only for d ≫ n³.",
    )


def _eigen_ratio_panel(ax: Axes, records: list[dict]) -> None:
    """(a, left) every masked/unmasked eigenvalue ratio over p, their mean and the top one's."""
    ps, ratios = _by_p(records, "eig_ratio")
    rng = np.random.default_rng(0)
    for i, (p, rat) in enumerate(zip(ps, ratios, strict=True)):
        x = p * np.exp(rng.uniform(-0.06, 0.06, rat.size))  # jitter on the log axis
        ax.scatter(
            x, rat.ravel(), s=6, color="0.6", alpha=0.6, label="all i = 1..n, all seeds" if i == 0 else None
        )
    ax.plot(ps, [r.mean() for r in ratios], "o-", color="C0", label="mean over i and seeds")
    ax.plot(ps, [r[:, 0].mean() for r in ratios], "s--", color="C3", label="top eigenvalue (i = 1), mean")
    ax.axhline(1.0, color="k", lw=0.8, label="1  (E[X M Xᵀ] = p X Xᵀ)")
    ax.set(
        xscale="log",
        xlabel="mask density p (fraction of trainable weights)",
        ylabel="λᵢ(X M Xᵀ) / (p · λᵢ(X Xᵀ))",
        title="Masked eigenvalues ≈ p × unmasked eigenvalues",
    )
    ax.legend(fontsize=8)


def _eigen_deviation_panel(ax: Axes, records: list[dict], delta: float) -> None:
    """(a, right) the largest eigenvalue deviation per seed against Theorem 5.1's and Bernstein's bounds."""
    ps = _by_p(records, "eig_ratio")[0]
    for s in _seeds(records):
        ax.plot(
            *_series(records, s, "deviation"),
            "o",
            ms=4,
            color="C0",
            alpha=0.7,
            label="measured maxᵢ |λᵢ(X M Xᵀ) − p λᵢ|, each seed" if s == _seeds(records)[0] else None,
        )
    ax.plot(
        ps,
        [v.mean() for v in _by_p(records, "thm51_bound")[1]],
        "-",
        color="C3",
        label=f"Theorem 5.1 bound n·√(2d(4n+ln 1/δ)), δ={delta:g}",
    )
    ax.plot(
        ps,
        [v.mean() for v in _by_p(records, "bernstein_bound")[1]],
        "--",
        color="C2",
        label="matrix Bernstein bound (reference, not in paper)",
    )
    ax.plot(
        ps,
        [v.mean() for v in _by_p(records, "p_lambda_1")[1]],
        ":",
        color="k",
        label="p · λ₁(X Xᵀ)  (size of the top eigenvalue)",
    )
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="mask density p",
        ylabel="eigenvalue deviation",
        title="Deviation stays within Theorem 5.1's bound",
    )
    ax.legend(fontsize=8)


def plot_stable_lr(records: list[dict], path: Path, n: int, d: int) -> Path:
    """(b) measured critical learning rate vs 2 / lambda_max, and loss curves at 0.9x and 1.1x."""
    fig = Figure(figsize=(11, 4.6))
    ax1, ax2 = fig.subplots(1, 2)
    _stable_lr_panel(ax1, records)
    _loss_curves_panel(ax2, records)
    return _finish(
        fig,
        path,
        f"(b) Stable learning rate of GD on the masked weights  (n={n}, d={d})",
        "Measured edge: largest rate whose residual did not grow within the step budget (grid "
        "refinement). Dashed curves stop when the loss exceeds 1e8 × its start (divergence).",
    )


def _stable_lr_panel(ax: Axes, records: list[dict]) -> None:
    """(b, left) the measured edge of stability per seed against 2 / lambda_1 and its mean-field value."""
    ps, lr_theory = _by_p(records, "lr_theory")
    ax.plot(ps, [v.mean() for v in lr_theory], "-", color="C0", label="2 / λ₁(X M Xᵀ)  (Proposition 5.2)")
    for s in _seeds(records):
        ax.plot(
            *_series(records, s, "lr_measured"),
            "x",
            ms=7,
            color="C3",
            label="measured edge of stability of GD, each seed" if s == _seeds(records)[0] else None,
        )
    ax.plot(
        ps,
        [2.0 / v.mean() for v in _by_p(records, "p_lambda_1")[1]],
        ":",
        color="k",
        label="2 / (p λ₁(X Xᵀ))  (using E[X M Xᵀ] = p X Xᵀ)",
    )
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="mask density p",
        ylabel="learning rate",
        title="Largest stable learning rate grows as p shrinks",
    )
    ax.legend(fontsize=8)


def _loss_curves_panel(ax: Axes, records: list[dict]) -> None:
    """(b, right) the first seed's loss curves at 0.9x and 1.1x of 2 / lambda_1, one colour per p."""
    seed0 = _seeds(records)[0]
    for c, r in enumerate(sorted((r for r in records if r["seed"] == seed0), key=lambda r: r["p"])):
        ax.plot(
            np.maximum(r["loss_curve_0.9"], 1e-30), "-", color=f"C{c}", label=f"p={p_key(r['p'])}: lr = 0.9 × 2/λ₁"
        )
        ax.plot(
            np.maximum(r["loss_curve_1.1"], 1e-30),
            "--",
            color=f"C{c}",
            label=f"p={p_key(r['p'])}: lr = 1.1 × 2/λ₁",
        )
    ax.set(
        yscale="log",
        xlabel="GD step",
        ylabel="training loss ½‖X(w₀ + m⊙Δ) − y‖²",
        title=f"GD converges below 2/λ₁, diverges above (seed {seed0})",
    )
    ax.legend(fontsize=7, ncol=2, loc="center right")


def plot_solution_norm(records: list[dict], path: Path, n: int, d: int, sigma: float) -> Path:
    """(c) norm of GD's limit vs p, against Proposition 5.3's lower bound."""
    fig = Figure(figsize=(11, 4.6))
    ax1, ax2 = fig.subplots(1, 2)
    ps, exact = _by_p(records, "sq_norm_exact")
    for s in _seeds(records):
        first = s == _seeds(records)[0]
        ax1.plot(
            *_series(records, s, "sq_norm_mc"),
            "o",
            ms=5,
            color="C0",
            label="Monte Carlo over noise draws, each seed" if first else None,
        )
        ax1.plot(
            *_series(records, s, "sq_norm_bound"),
            "v--",
            ms=5,
            color="C3",
            lw=0.8,
            label="Proposition 5.3 bound (‖Xw*‖² + nσ²) / λ₁(X M Xᵀ)" if first else None,
        )
        ax2.plot(*_series(records, s, "norm_gd"), "o-", ms=4, label=f"seed {s}")
    ax1.plot(ps, [v.mean() for v in exact], "-", color="C0", lw=1, label="exact E‖Δ∞‖², mean over seeds")
    ax1.plot(ps, exact[-1].mean() * ps[-1] / ps, ":", color="k", label="∝ 1/p reference")
    ax1.set(
        xscale="log",
        yscale="log",
        xlabel="mask density p",
        ylabel="E‖Δ∞‖²  (squared norm of GD's limit)",
        title="Expected squared norm ≥ Proposition 5.3's bound",
    )
    ax1.legend(fontsize=8)
    ax2.set(
        xscale="log",
        yscale="log",
        xlabel="mask density p",
        ylabel="‖Δ∞‖  (GD run to convergence)",
        title="Solution norm grows as p shrinks (one noise draw)",
    )
    ax2.legend(fontsize=8)
    return _finish(
        fig,
        path,
        f"(c) Distance travelled by GD  (n={n}, d={d}, noise σ={sigma:g})",
        "Δ∞ is the limit of GD from Δ = 0: the minimum-norm solution on the kept coordinates. "
        "Masks are nested in p for a fixed seed, so each right-hand curve is monotone.",
    )
