"""PNG plots of the analysis results (paper Fig. 4a/4b, and power-iteration convergence).

Functions take plain data (lists of dicts of numbers), so the CLI can draw results stored by the
experiment runner. ``matplotlib.figure.Figure`` is used directly (Agg canvas, no pyplot state).
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from randmask_lab.fs import save_figure

_PERCENT = FuncFormatter(lambda x, _: f"{100 * x:.10g}%")


def _finish(fig: Figure, path: str | Path, title: str, caption: str = "") -> Path:
    fig.suptitle(title, fontsize=12)
    lines = textwrap.wrap(caption, width=int(fig.get_figwidth() * 15))
    if lines:
        fig.text(0.5, 0.01, "\n".join(lines), ha="center", va="bottom", fontsize=8, color="0.3")
    fig.tight_layout(rect=(0, 0.035 * len(lines), 1, 0.95))
    return save_figure(fig, path)


def _series(records: Sequence[Mapping], key: str) -> dict[str, tuple[list[float], list[float]]]:
    """{method: (ratios, values)} sorted by ratio, keeping only positive values (log axes)."""
    out: dict[str, tuple[list[float], list[float]]] = {}
    for method in dict.fromkeys(r["method"] for r in records):  # first-seen order
        pts = sorted((float(r["ratio"]), float(r[key])) for r in records
                     if r["method"] == method and r.get(key) is not None and float(r[key]) > 0)
        out[method] = ([x for x, _ in pts], [y for _, y in pts])
    return out


def _dropped(records: Sequence[Mapping], keys: Sequence[str]) -> int:
    return sum(1 for r in records for k in keys if r.get(k) is not None and float(r[k]) <= 0)


def _ratio_axis(ax, ylabel: str) -> None:
    ax.set(xscale="log", yscale="log", xlabel="trainable parameters (% of all parameters, log scale)",
           ylabel=ylabel)
    ax.xaxis.set_major_formatter(_PERCENT)
    ax.grid(True, which="major", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def plot_lambda_max(records: Sequence[Mapping], path: str | Path, task: str = "", norm: bool = False) -> Path:
    """Fig. 4a: top Hessian eigenvalue (or, ``norm``, the Hessian norm max |λ|) before and after
    training vs trainable ratio, per method.

    ``records``: dicts with ``method`` (str), ``ratio`` (trainable fraction of all parameters, e.g.
    1e-3 for 0.1%; full fine-tuning is 1.0), ``before`` and/or ``after`` (λ_max, floats).
    """
    fig = Figure(figsize=(7.5, 5))
    ax = fig.subplots()
    for i, method in enumerate(dict.fromkeys(r["method"] for r in records)):
        mine = [r for r in records if r["method"] == method]
        for key, style, fill in (("before", "--", "none"), ("after", "-", None)):
            xs, ys = _series(mine, key)[method]
            if xs:
                ax.plot(xs, ys, style, marker="o", color=f"C{i}", markerfacecolor=fill,
                        label=f"{method}, {key} training")
    name = "‖H‖₂ = max |λ|" if norm else "λ_max"
    _ratio_axis(ax, f"{name} of the loss Hessian (log scale)")
    dropped = _dropped(records, ("before", "after"))
    caption = ("Hollow markers / dashed: at the pretrained weights; filled / solid: after fine-tuning. "
               f"Lower {name} = flatter loss, larger stable learning rate (lr < 2/λ).")
    if dropped:
        caption += f" {dropped} value(s) <= 0 not shown on the log axis."
    title = "Hessian norm" if norm else "Top Hessian eigenvalue"
    return _finish(fig, path, f"{title} vs trainable budget{' — ' + task if task else ''}", caption)


def plot_distance(records: Sequence[Mapping], path: str | Path, task: str = "") -> Path:
    """Fig. 4b: L2 distance travelled from the pretrained weights vs trainable ratio, per method.

    ``records``: dicts with ``method``, ``ratio`` and ``distance`` (total L2 norm of the delta).
    """
    fig = Figure(figsize=(7.5, 5))
    ax = fig.subplots()
    for i, (method, (xs, ys)) in enumerate(_series(records, "distance").items()):
        if xs:
            ax.plot(xs, ys, "-", marker="o", color=f"C{i}", label=method)
    _ratio_axis(ax, "‖θ_trained − θ_pretrained‖₂ (log scale)")
    caption = "Total L2 norm of the fine-tuning delta over all trainable matrices, after training."
    dropped = _dropped(records, ("distance",))
    if dropped:
        caption += f" {dropped} value(s) <= 0 not shown on the log axis."
    return _finish(fig, path, f"Distance from the pretrained weights vs budget{' — ' + task if task else ''}", caption)


def plot_power_trace(traces: Sequence[float] | Mapping[str, Sequence[float]], path: str | Path,
                     tol: float | None = None, title: str = "Power iteration convergence") -> Path:
    """(c) Estimate of λ_max per iteration, and its relative change on a log axis.

    ``traces``: one list of estimates (``EigenResult.trace``), or ``{label: trace}`` for several runs.
    ``tol``: draw the stopping tolerance on the relative-change panel.
    """
    runs = {"λ estimate": list(traces)} if not isinstance(traces, Mapping) else dict(traces)
    fig = Figure(figsize=(11, 4.4))
    ax1, ax2 = fig.subplots(1, 2)
    for i, (label, trace) in enumerate(runs.items()):
        if not trace:
            continue
        its = range(1, len(trace) + 1)
        ax1.plot(its, trace, "o-", ms=3, color=f"C{i}", label=f"{label} (final {trace[-1]:.4g})")
        change = [abs(b - a) / abs(b) if b else float("nan") for a, b in zip(trace, trace[1:])]
        ax2.plot(list(its)[1:], [c if c > 0 else float("nan") for c in change], "o-", ms=3,
                 color=f"C{i}", label=label)
    if tol is not None:
        ax2.axhline(tol, color="k", lw=0.8, ls="--", label=f"tolerance {tol:g}")
    ax1.set(xlabel="iteration (Hessian-vector products)", ylabel="Rayleigh quotient vᵀHv",
            title="Eigenvalue estimate")
    ax2.set(yscale="log", xlabel="iteration", ylabel="|λₖ − λₖ₋₁| / |λₖ| (log scale)",
            title="Relative change (stopping criterion)")
    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return _finish(fig, path, title)


def plot_epoch_curves(curves: Mapping[str, Sequence[tuple[int, float | None, float | None]]], path: str | Path,
                      metric: str = "accuracy", title: str = "Validation score per epoch") -> Path:
    """Paper Fig. 4b (right): validation metric and loss against the epoch, one line per run.

    ``curves``: ``{label: [(epoch, val_metric, val_loss), ...]}``; None values are skipped.
    """
    fig = Figure(figsize=(11, 4.4))
    ax1, ax2 = fig.subplots(1, 2)
    for i, (label, points) in enumerate(curves.items()):
        for ax, k in ((ax1, 1), (ax2, 2)):
            pts = [(p[0], p[k]) for p in points if p[k] is not None]
            if pts:
                ax.plot([e for e, _ in pts], [v for _, v in pts], "o-", ms=3, color=f"C{i % 10}", label=label)
    ax1.set(xlabel="epoch", ylabel=f"validation {metric}", title=f"Validation {metric} (higher is better)")
    ax2.set(xlabel="epoch", ylabel="validation loss", title="Validation loss (lower is better)")
    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    caption = "Epoch 0 (if present) is the model before training. A curve still rising at the last epoch " \
              "means the learning rate is too small for the budget (underfitting), not that it generalises worse."
    return _finish(fig, path, title, caption)
