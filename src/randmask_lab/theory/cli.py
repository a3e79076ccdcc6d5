"""`randmask theory`: simulate section 5 of the paper and write three plots plus a JSON summary.

Wire into the main CLI with ``register(subparsers)``; the sub-command's handler is stored as
``args.func`` and returns an exit code.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from randmask_lab.argtypes import non_negative_int, positive_int
from randmask_lab.errors import LabError
from randmask_lab.fs import make_folder, write_json
from randmask_lab.theory.experiment import check_sweep, fmt_table, run_sweep, summarise
from randmask_lab.theory.linreg import check_p

DEFAULT_P_VALUES = (0.05, 0.1, 0.2, 0.5, 1.0)
DEFAULT_SEEDS = (0, 1, 2, 3, 4)
FIGURES = {"a": "eigen_concentration.png", "b": "stable_lr.png", "c": "solution_norm.png"}
# The statements the summary's numbers test, written into it so that a reader of the JSON has them at hand.
FORMULAS = {
    "thm51_bound": "|lambda_i(X M X^T) - p lambda_i(X X^T)| <= B^2 n sqrt(2 d (4 n + ln(1/delta))), "
    "w.p. >= 1 - delta over the mask, B = max|X_ij|",
    "prop52_threshold": "GD on 1/2||X(w0 + m*Delta) - y||^2 converges iff lr < 2 / lambda_1(X M X^T)",
    "prop53_bound": "E_noise ||Delta_inf||^2 >= (||X w*||^2 + n sigma^2) / lambda_1(X M X^T)",
}


def run_theory(
    out_dir: str | Path,
    n: int = 20,
    d: int = 2000,
    p_values: Sequence[float] = DEFAULT_P_VALUES,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    sigma: float = 0.5,
    delta: float = 0.05,
    gd_steps: int = 4000,
    noise_draws: int = 200,
    verbose: bool = True,
) -> dict:
    """Run the sweep over ``p_values`` x ``seeds``, write the three PNGs and ``theory_summary.json``.

    Returns the summary dict (config, per-p numbers, file paths). Raises ``ValueError`` for p
    outside (0, 1]; warns when n >= d (the theory assumes n < d).
    """
    p_values = sorted({check_p(p) for p in p_values})
    out = make_folder(out_dir)
    records = run_sweep(n, d, p_values, list(seeds), sigma, delta, gd_steps, noise_draws)
    paths = _draw_figures(records, out, n, d, sigma, delta)
    summary = {
        "config": {
            "n": n,
            "d": d,
            "p_values": p_values,
            "seeds": list(seeds),
            "sigma": sigma,
            "delta": delta,
            "gd_steps": gd_steps,
            "noise_draws": noise_draws,
        },
        "formulas": dict(FORMULAS),
        "per_p": summarise(records),
        "files": {k: str(v) for k, v in paths.items()},
    }
    write_json(out / "theory_summary.json", summary, indent=2)
    if verbose:
        print(fmt_table(summary["per_p"]))
        print(f"wrote {', '.join(FIGURES.values())} and theory_summary.json to {out}")
    return summary



def _draw_figures(records: list, out: Path, n: int, d: int, sigma: float, delta: float) -> dict[str, Path]:
    """Draw figures a, b and c into ``out``; their paths by letter."""
    from randmask_lab.theory import plots  # matplotlib only when the plots are drawn

    return {
        "a": plots.plot_eigen_concentration(records, out / FIGURES["a"], n, d, delta),
        "b": plots.plot_stable_lr(records, out / FIGURES["b"], n, d),
        "c": plots.plot_solution_norm(records, out / FIGURES["c"], n, d, sigma),
    }

def _p_value(text: str) -> float:
    try:
        return check_p(float(text))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def _cmd(args: argparse.Namespace) -> int:
    try:  # the settings' checks only (no work yet): a ValueError here is the user's to fix
        check_sweep(args.n, args.d, args.p_values, args.seeds, args.sigma, args.delta)
    except ValueError as err:
        raise LabError(f"{err}.") from err
    run_theory(
        args.out,
        n=args.n,
        d=args.d,
        p_values=args.p_values,
        seeds=args.seeds,
        sigma=args.sigma,
        delta=args.delta,
        gd_steps=args.gd_steps,
        noise_draws=args.noise_draws,
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``theory`` sub-command to a parent parser's ``add_subparsers()`` object."""
    parser = subparsers.add_parser(
        "theory",
        help="simulate the paper's masked linear regression (section 5) and plot its three claims",
        description=(
            "Over-parameterised linear regression with Bernoulli(p) masks and GD on the masked weights: "
            "(a) eigenvalue concentration vs Theorem 5.1, (b) stable learning rate vs Proposition 5.2, "
            "(c) solution norm vs Proposition 5.3. Writes three PNGs and theory_summary.json."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=Path("runs/theory"), help="output directory")
    parser.add_argument(
        "--n", type=positive_int, default=20, help="number of samples (the theory needs n < d)"
    )
    parser.add_argument("--d", type=positive_int, default=2000, help="number of features / weights")
    parser.add_argument(
        "--p-values",
        type=_p_value,
        nargs="+",
        default=list(DEFAULT_P_VALUES),
        help="mask densities p in (0, 1] to sweep",
    )
    parser.add_argument(
        "--seeds",
        type=non_negative_int,
        nargs="+",
        default=list(DEFAULT_SEEDS),
        help="seeds; each fixes X, w0, w*, the noise and the masks",
    )
    parser.add_argument("--sigma", type=float, default=0.5, help="noise standard deviation σ of the targets")
    parser.add_argument("--delta", type=float, default=0.05, help="failure probability δ in Theorem 5.1")
    parser.add_argument(
        "--gd-steps",
        type=positive_int,
        default=4000,
        help="GD steps per trial when locating the critical learning rate",
    )
    parser.add_argument(
        "--noise-draws",
        type=positive_int,
        default=200,
        help="noise draws for the Monte Carlo E‖Δ∞‖² in Proposition 5.3",
    )
    parser.set_defaults(func=_cmd)
    return parser
