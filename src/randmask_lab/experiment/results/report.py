"""Paper-style tables from the results store: each method/budget at its best learning rate.

The best LR of a (model, protocol, task, method, budget) cell is the one with the best mean
*validation* score over seeds (``val_loss``, lowest; or ``val_metric``, highest), as the paper
selects by validation; the cell shows that LR's mean (± std) *test* metric over seeds.
A diverged run counts as infinitely bad on validation.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from randmask_lab.experiment.results.record import RunRecord
from randmask_lab.experiment.results.settings import row_labels
from randmask_lab.experiment.results.store import ResultStore, protocol_label

Select = Literal["val_loss", "val_metric"]
TASK_LABELS = {"sst2": "SST-2", "rte": "RTE", "cb": "CB", "boolq": "BoolQ", "wsc": "WSC", "wic": "WiC",
               "multirc": "MultiRC", "copa": "COPA", "record": "ReCoRD", "squad": "SQuAD", "drop": "DROP"}


@dataclass
class Cell:
    """One table cell: the chosen LR, the test metrics of its seeds, the LRs tried."""

    lr: float | None
    tests: list[float]
    n_lrs: int
    diverged: bool = False
    trained: bool = True
    """False for zero-shot cells, whose LR means nothing and is not shown."""

    def text(self) -> str:
        if self.lr is None or not self.tests:
            return "diverged" if self.diverged else "-"
        mean = 100 * statistics.fmean(self.tests)
        spread = f" ±{100 * statistics.stdev(self.tests):.1f}" if len(self.tests) > 1 else ""
        return f"{mean:.1f}{spread}" + (f" ({self.lr:.0e})" if self.trained else "")


def ratio_text(ratio: float) -> str:
    """``1e-04``, or as many digits as the ratio needs (``4.9e-02``): a label never rounds one budget to another's
    name (4.9% must not read as the paper's 5% row)."""
    for digits in range(6):
        text = f"{ratio:.{digits}e}"
        if float(text) == ratio:
            return text
    return f"{ratio:.6e}"


def method_label(config: dict[str, Any]) -> str:
    """e.g. "randmask 1e-04", "lora", "lora nf4" (a quantized base is another cell)."""
    quantized = f" {config['quantize']}" if config.get("quantize", "none") != "none" else ""  # absent in old records
    if config.get("ratio") is not None:
        return f"{config['method']} {ratio_text(config['ratio'])}{quantized}"
    if config.get("density") is not None:
        return f"{config['method']} p={config['density']:g}{quantized}"
    return config["method"] + quantized


def _selection_score(records: Sequence[RunRecord], select_by: Select) -> float:
    """Lower is better; inf when any seed diverged or lacks the score."""
    values = []
    for r in records:
        v = r.val_loss if select_by == "val_loss" else r.val_metric
        if r.status != "done" or v is None or not math.isfinite(v):
            return math.inf
        values.append(v if select_by == "val_loss" else -v)
    return statistics.fmean(values) if values else math.inf


def best_cell(records: Sequence[RunRecord], select_by: Select = "val_loss") -> Cell:
    """Pick the LR with the best mean validation score over the seeds every LR has; report its seeds' test metrics.

    In a full grid that is every seed. In a study (seed 0 searched, seeds 1 and 2 at the chosen LR only)
    it is the search seed, so seeds added at the chosen LR never move the choice (``study.cells`` alike).
    """
    by_lr: dict[float, list[RunRecord]] = defaultdict(list)
    for r in records:
        by_lr[r.config["lr"]].append(r)
    common = set.intersection(*({r.config["seed"] for r in rs} for rs in by_lr.values()))

    def score(runs: list[RunRecord]) -> float:  # a diverged seed anywhere disqualifies the LR
        if not math.isfinite(_selection_score(runs, select_by)):
            return math.inf
        return _selection_score([r for r in runs if not common or r.config["seed"] in common], select_by)

    scored = sorted((score(rs), lr) for lr, rs in by_lr.items())
    score, lr = scored[0]
    if not math.isfinite(score):
        return Cell(None, [], len(by_lr), diverged=any(r.status == "diverged" for r in records))
    tests = [r.test_metric for r in by_lr[lr] if r.test_metric is not None]
    return Cell(lr, tests, len(by_lr), trained=by_lr[lr][0].config["method"] != "zeroshot")


def _params(records: Sequence[RunRecord]) -> str:
    """Trainable share of the method itself (without the task head), as in the paper's tables."""
    r = records[0]
    groups = r.trainable_report.get("groups", {})
    own = sum(v for k, v in groups.items() if k != "head") if groups else r.trainable
    return f"{100 * own / r.total:.4g}%" if r.total else "?"


def report_tables(records: Sequence[RunRecord], select_by: Select = "val_loss") -> str:
    """Markdown: one table per (model, protocol); rows method/budget, columns tasks + average."""
    groups: dict[tuple[str, str], dict[str, dict[str, list[RunRecord]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list)))
    finished = [r for r in records if r.status in ("done", "diverged")]
    labels = row_labels(finished, method_label, protocol_label)  # runs of other settings are other rows
    for r in finished:
        groups[(r.config["model"], protocol_label(r.config))][labels[id(r)]][r.config["task"]].append(r)
    if not groups:
        return "No finished runs in the store."
    out = []
    for (model, protocol), rows in sorted(groups.items()):
        tasks = sorted({t for per_task in rows.values() for t in per_task}, key=task_order)
        head = ["Method", "Params", *[TASK_LABELS.get(t, t) for t in tasks]] + (["Avg"] if len(tasks) > 1 else [])
        lines = [f"### {model} — {protocol}", "", "| " + " | ".join(head) + " |",
                 "|" + "---|" * len(head)]
        for label, per_task in sorted(rows.items(), key=lambda kv: method_order(kv[0])):
            cells = {t: best_cell(per_task[t], select_by) for t in tasks if t in per_task}
            texts = [cells[t].text() if t in cells else "-" for t in tasks]
            if len(tasks) > 1:
                means = [statistics.fmean(c.tests) for c in cells.values() if c.tests]
                texts.append(f"{100 * statistics.fmean(means):.1f}" if len(means) == len(tasks) else "-")
            first = next(iter(per_task.values()))
            lines.append("| " + " | ".join([label, _params(first), *texts]) + " |")
        out.append("\n".join(lines))
    metric_note = ("Cells: test metric ×100, mean ± std over seeds, at the learning rate (in brackets) with the "
                   f"best mean validation {'loss' if select_by == 'val_loss' else 'metric'} over seeds; "
                   "Params: the method's own trainable share of all parameters (task head excluded).")
    return "\n\n".join(out) + "\n\n" + metric_note


def task_order(task: str) -> int:
    order = list(TASK_LABELS)
    return order.index(task) if task in order else len(order)


def method_order(label: str) -> tuple[int, float]:
    names = ["zeroshot", "full", "lora", "adalora", "adapter", "bitfit", "prefix", "randmask", "structured"]
    method, _, budget = label.partition(" ")
    budget = budget.split(" [")[0]  # without a settings suffix ("[r=16]"): ordered as its plain label
    rank = names.index(method) if method in names else len(names)
    try:
        return rank, -float(budget)
    except ValueError:
        return rank, 0.0


def labelled_best_runs(records: Sequence[RunRecord], select_by: Select = "val_loss",
                       all_seeds: bool = False) -> list[tuple[RunRecord, str]]:
    """``best_runs`` with each run's row label (the method, budget and any setting that splits its cell)."""
    cells: dict[tuple[str, str, str, str], list[RunRecord]] = defaultdict(list)
    finished = [r for r in records if r.status in ("done", "diverged")]
    labels = row_labels(finished, method_label, protocol_label)
    for r in finished:
        cells[(r.config["model"], protocol_label(r.config), r.config["task"], labels[id(r)])].append(r)
    chosen = []
    for key in sorted(cells, key=lambda k: (k[0], k[1], task_order(k[2]), method_order(k[3]))):
        cell = best_cell(cells[key], select_by)
        if cell.lr is not None:
            at_lr = sorted((r for r in cells[key] if r.config["lr"] == cell.lr), key=lambda r: r.config["seed"])
            chosen += [(r, key[3]) for r in (at_lr if all_seeds else at_lr[:1])]
    return chosen


def best_runs(records: Sequence[RunRecord], select_by: Select = "val_loss", all_seeds: bool = False) -> list[RunRecord]:
    """The run (first seed; ``all_seeds``: every seed) at the chosen LR of every (model, protocol, task,
    method/budget) cell."""
    return [r for r, _ in labelled_best_runs(records, select_by, all_seeds)]


def report(store: ResultStore, select_by: Select = "val_loss", **where: Any) -> str:
    """The Markdown report of every finished run in ``store`` matching ``column=value`` filters."""
    return report_tables(store.records(**where), select_by)
