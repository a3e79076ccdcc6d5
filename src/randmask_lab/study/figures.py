"""The study's PNGs: Fig. 3's analogue (test metric and validation loss vs LR, one curve per ratio,
per task), structured vs random, and Table 5's sparsity curve beside the paper's OPT-125m row. Fig. 4
comes from `randmask figure4` on the analysis outputs."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure

from randmask_lab.fs import save_figure
from randmask_lab.study.cells import StudyCell
from randmask_lab.study.paper import PAPER_MODEL, PAPER_RATIOS, paper_value
from randmask_lab.study.stats import mean_interval
from randmask_lab.study.tables import paper_ratio, seed_note

# Appended to a caption where a point carries a seed label (``_seed_label``).
SEEDS_CAPTION = ("; a label gives the seeds of a point with one seed (no interval) or with seeds that finished without "
                 "a test result at the chosen LR (left out of its mean)")


def _save(fig: Figure, path: Path, title: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = textwrap.wrap(title, width=int(9 * fig.get_figwidth()))  # ~9 characters per inch at size 11
    fig.suptitle("\n".join(lines), fontsize=11)
    fig.tight_layout()  # makes room for the suptitle itself (matplotlib >= 3.3)
    return save_figure(fig, path)


def _seed_label(ax, x: float, y: float, cell: StudyCell) -> bool:
    """Label a plotted mean with its seeds where it hides something: ``n=2 of 3: seed 2 diverged`` (the failed
    seeds are not in the mean: ``tables.seed_note``), or ``n=1`` (one seed, so no interval is drawn). Whether it
    labelled."""
    text = seed_note(cell) or ("n=1" if len(cell.tests) == 1 else None)
    if text:
        ax.annotate(text, (x, y), xytext=(-4, -10), textcoords="offset points", fontsize=6, color="0.25",
                    ha="right")  # leftwards: the largest ratio sits at the right edge
    return text is not None


def plot_lr_curves(cells: Sequence[StudyCell], path: str | Path, model: str) -> Path:
    """Per task, one curve per ratio: test metric and validation loss vs LR on the LR-search seeds (the runs
    the choice compared, so ★ marks the lowest validation loss), and at the chosen LR the mean and 95% t
    interval of the test metric over all its seeds."""
    masked = [c for c in cells if c.method == "randmask" and c.ratio is not None]
    tasks = sorted({c.key[2] for c in masked})
    fig = Figure(figsize=(4.2 * max(len(tasks), 1), 6.4))
    labelled = False
    for j, task in enumerate(tasks):
        top, bottom = fig.add_subplot(2, len(tasks), j + 1), fig.add_subplot(2, len(tasks), len(tasks) + j + 1)
        for i, cell in enumerate(sorted((c for c in masked if c.key[2] == task), key=lambda c: -c.ratio)):
            color = f"C{i}"
            lrs = sorted(cell.search_test)
            top.plot(lrs, [100 * cell.search_test[lr] for lr in lrs], "o-", color=color,
                     label=f"{100 * cell.ratio:g}%")
            finite = [lr for lr in cell.lrs if math.isfinite(cell.search_val_loss[lr])]
            bottom.plot(finite, [cell.search_val_loss[lr] for lr in finite], "o-", color=color)
            if cell.lr is None:
                continue
            bottom.plot([cell.lr], [cell.search_val_loss[cell.lr]], "k*", ms=10)
            est = mean_interval(list(cell.tests.values()))
            err = None if est.low is None else [[100 * (est.mean - est.low)], [100 * (est.high - est.mean)]]
            top.errorbar([cell.lr * 1.08], [100 * est.mean], yerr=err, fmt="s", mfc="white", color=color,
                         capsize=3, ms=5)  # nudged right of the search point it would hide
            labelled = _seed_label(top, cell.lr * 1.08, 100 * est.mean, cell) or labelled
        for ax, ylabel in ((top, "test metric ×100"), (bottom, "validation loss")):
            ax.set_xscale("log")
            ax.set_xlabel("learning rate")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
        top.set_title(task)
        top.legend(title="trainable", fontsize=8)
    return _save(fig, Path(path), f"{model}: randmask vs LR on the LR-search seed (● ; ★ = chosen LR, lowest "
                                  "validation loss) and, at the chosen LR, test mean and 95% t interval over all "
                                  "seeds (□)" + SEEDS_CAPTION * labelled)


def plot_structured_vs_random(cells: Sequence[StudyCell], path: str | Path, model: str) -> Path | None:
    """Means with 95% t intervals: random vs structured masking at each ratio and task both have (markers,
    not bars: the differences are a few points, invisible on bars that start at zero)."""
    pairs = []
    for c in cells:
        if c.method != "structured" or not c.tests:
            continue
        twin = next((r for r in cells if r.method == "randmask" and r.ratio == c.ratio and r.key[2] == c.key[2]
                     and r.tests), None)
        if twin is not None:
            pairs.append((f"{c.key[2]} {100 * c.ratio:g}%", twin, c))
    if not pairs:
        return None
    pairs.sort(key=lambda p: p[0])
    fig = Figure(figsize=(1.6 * len(pairs) + 2, 4))
    ax = fig.add_subplot(1, 1, 1)
    labelled = False
    for i, (_, rnd, st) in enumerate(pairs):
        for offset, cell, color, name in ((-0.2, rnd, "C0", "random"), (0.2, st, "C1", "structured")):
            est = mean_interval(list(cell.tests.values()))
            err = None if est.low is None else [[100 * (est.mean - est.low)], [100 * (est.high - est.mean)]]
            ax.errorbar(i + offset, 100 * est.mean, yerr=err, fmt="o", color=color, capsize=4,
                        label=name if i == 0 else None)
            labelled = _seed_label(ax, i + offset, 100 * est.mean, cell) or labelled
    ax.set_xticks(range(len(pairs)), [p[0] for p in pairs])
    ax.set_xlim(-0.6, len(pairs) - 0.4)
    ax.set_ylabel("test metric ×100")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, Path(path), f"{model}: random vs structured masking (mean, 95% t interval over seeds)"
                 + SEEDS_CAPTION * labelled)


def _errorbar(cell: StudyCell) -> tuple[float, list[list[float]] | None]:
    """(mean x100, matplotlib yerr of the 95% t interval or None) of a cell's seeds."""
    est = mean_interval(list(cell.tests.values()))
    err = None if est.low is None else [[100 * (est.mean - est.low)], [100 * (est.high - est.mean)]]
    return 100 * est.mean, err


def _ladder(ratio: float) -> float:
    """Where a ratio sits on the paper's ladder: the paper's ratio it stands beside (``tables.paper_ratio``, the
    mapping the "beside the paper" table uses), else its own."""
    return paper_ratio(ratio) or ratio


def curve_joins(points: Sequence[StudyCell], known: Sequence[StudyCell]) -> list[tuple[StudyCell, StudyCell,
                                                                                       list[float]]]:
    """Each pair of neighbouring ``points`` (cells with a result, by ratio) with the ratios between them that have
    none: a ratio of ``known`` (the task's cells, a result or not) or of the paper's ladder that lies between the
    two and has no point. A plain line across such a ratio would draw a value the study has not got (its search
    unfinished, every LR diverged, or never run), so the curve says where it does."""
    have = {_ladder(c.ratio) for c in points}
    ladder = {*PAPER_RATIOS, *(_ladder(c.ratio) for c in known)}
    ours = sorted(points, key=lambda c: c.ratio)
    return [(a, b, sorted(r for r in ladder - have if _ladder(a.ratio) < r < _ladder(b.ratio)))
            for a, b in zip(ours, ours[1:])]


def _plot_ours(ax, points: Sequence[StudyCell], known: Sequence[StudyCell], model: str) -> bool:
    """The study's curve on one task: each ratio's mean and interval (hollow: one seed, no interval), joined by a
    solid line, or a dotted one across ratios without a result (``curve_joins``; the legend names them, so a
    missing ratio is never bridged silently). Whether a point carries a seed label."""
    labelled = False
    for cell in points:
        mean, err = _errorbar(cell)
        ax.errorbar([100 * cell.ratio], [mean], yerr=err, fmt="o", color="C0", capsize=3,
                    mfc="white" if err is None else "C0")
        labelled = _seed_label(ax, 100 * cell.ratio, mean, cell) or labelled
    joins = curve_joins(points, known)
    label = f"randmask, {model} (mean, 95% t interval)"
    for a, b, gaps in joins:
        ax.plot([100 * a.ratio, 100 * b.ratio], [_errorbar(a)[0], _errorbar(b)[0]], ":" if gaps else "-",
                color="C0", label=None if gaps else label)
        label = label if gaps else None
    if label and points:  # no solid join: the legend still names the study's points
        ax.plot([], [], "o-", color="C0", label=label)
    gaps = sorted({r for _, _, between in joins for r in between})
    if gaps:
        ax.plot([], [], ":", color="C0", label=f"dotted: across {', '.join(f'{100 * r:g}%' for r in gaps)}, "
                                               "no result here")
    return labelled


def plot_sparsity_curve(cells: Sequence[StudyCell], path: str | Path, model: str, min_ratios: int = 4
                        ) -> Path | None:
    """Table 5's analogue as a curve, per task with at least ``min_ratios`` randmask ratios: test metric (mean and
    95% t interval over seeds, at each ratio's chosen LR) against the trainable ratio, beside the paper's OPT-125m
    row; the study's full FT and LoRA means as horizontal lines. None when no task has enough ratios. A cell
    without a result (every LR diverged, or its LR search unfinished) is no point, and the line breaks there."""
    known: dict[str, list[StudyCell]] = {}
    for c in cells:
        if c.method == "randmask" and c.ratio is not None:
            known.setdefault(c.key[2], []).append(c)
    by_task = {t: [c for c in cs if c.tests and not c.search_unfinished] for t, cs in known.items()}
    tasks = sorted(t for t, cs in by_task.items() if len(cs) >= min_ratios)
    if not tasks:
        return None
    fig = Figure(figsize=(5.2 * len(tasks), 4.2))
    labelled = False
    for j, task in enumerate(tasks):
        ax = fig.add_subplot(1, len(tasks), j + 1)
        labelled = _plot_ours(ax, by_task[task], known[task], model) or labelled
        paper = [(100 * r, paper_value(task, f"randmask {r:.0e}")) for r in PAPER_RATIOS]
        paper = [(x, y) for x, y in paper if y is not None]
        if paper:
            ax.plot(*zip(*paper), "x--", color="0.45", label=f"paper, {PAPER_MODEL} (its Table 5)")
        for method, color in (("full", "C3"), ("lora", "C2")):
            twin = next((c for c in cells if c.method == method and c.key[2] == task and c.tests), None)
            if twin is not None:
                ax.axhline(_errorbar(twin)[0], color=color, lw=1, label=f"{method} (this study, mean)")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters, % of all")
        ax.set_ylabel("test metric ×100")
        ax.set_title(task)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, Path(path), f"{model}: test metric vs trainable ratio (Table 5's analogue), beside the "
                                  f"paper's {PAPER_MODEL} row" + SEEDS_CAPTION * labelled)
