"""The study's Markdown tables: mean ± std [95% t interval] over seeds, and paired differences."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence

from randmask_lab.experiment.results.report import TASK_LABELS, method_order, task_order
from randmask_lab.study.cells import CellKey, StudyCell
from randmask_lab.study.paper import PAPER_MODEL, PAPER_PROTOCOL, PAPER_RATIOS, paper_value
from randmask_lab.study.plan import RunsLeft
from randmask_lab.study.stats import FAR_OFF_Z, average_by_seed, far_off_seeds, mean_interval, paired_difference

Left = Mapping[tuple[str, str], RunsLeft]  # (task, method label) -> the runs the spec's plan has left for the cell

# The differences the study reports: (left, right) method labels, left - right, paired by seed.
DIFFERENCES = (("randmask 1e-03", "lora"), ("randmask 1e-03", "full"), ("randmask 1e-04", "lora"),
               ("randmask 1e-05", "lora"), ("randmask 1e-04", "structured 1e-04"),
               ("randmask 1e-05", "structured 1e-05"))


def by_model(cells: dict[CellKey, StudyCell]) -> dict[str, dict[str, dict[str, StudyCell]]]:
    """model -> method label -> column -> cell. A column is a task, or "task [protocol]" when a task
    ran under more than one protocol (runs are only compared within one protocol)."""
    protocols: dict[tuple[str, str], set[str]] = defaultdict(set)
    for model, protocol, task, _ in cells:
        protocols[(model, task)].add(protocol)
    out: dict[str, dict[str, dict[str, StudyCell]]] = defaultdict(lambda: defaultdict(dict))
    for (model, protocol, task, label), cell in cells.items():
        column = task if len(protocols[(model, task)]) == 1 else f"{task} [{protocol}]"
        out[model][label][column] = cell
    return out


def _column_order(column: str) -> tuple[int, str]:
    return task_order(column.split(" [")[0]), column


def _column_label(column: str) -> str:
    task, _, rest = column.partition(" [")
    return TASK_LABELS.get(task, task) + (f" [{rest}" if rest else "")


# How far (relative) a study's ratio may lie from one of the paper's and still stand beside it: SmolLM2's v
# projections cap the trainable share at 4.93%, so the confirmatory spec runs 4.9% for the paper's 5%
# (docs/confirmatory.md). One mapping for the "beside the paper" table and the sparsity curve, so the two pair alike.
STAND_IN = 0.05


def paper_ratio(ratio: float) -> float | None:
    """The paper's ratio (``PAPER_RATIOS``) that a study's masking ratio stands beside: the nearest, when within
    ``STAND_IN`` of it; else None."""
    if not ratio > 0:
        return None
    near = min(PAPER_RATIOS, key=lambda r: abs(math.log(ratio / r)))
    return near if abs(ratio / near - 1) <= STAND_IN else None


def paper_label(label: str) -> str:
    """The paper's row a study row (``randmask 4.9e-02``) stands beside (``randmask 5e-02``); any other label as it
    is (a quantized or p= row has no paper row, and its label does not parse as a ratio)."""
    method, _, budget = label.partition(" ")
    try:
        near = paper_ratio(float(budget)) if method == "randmask" else None
    except ValueError:
        return label
    return label if near is None else f"randmask {near:.0e}"


def failed_text(failed: Mapping[int, str], where: str = "") -> str:
    """``seed 2 diverged``, ``seeds 2, 5 diverged; seed 7 scale_collapsed``, each followed by `` in {where}`` when
    given: a cell's seeds that finished without a test result at its chosen LR (``StudyCell.failed``)."""
    by_status: dict[str, list[int]] = defaultdict(list)
    for seed, status in sorted(failed.items()):
        by_status[status].append(seed)
    return "; ".join(f"seed{'s' * (len(seeds) > 1)} {', '.join(map(str, seeds))} {status}"
                     + (f" in {where}" if where else "") for status, seeds in sorted(by_status.items()))


def seed_note(cell: StudyCell) -> str | None:
    """``n=2 of 3: seed 2 diverged`` when seeds of the cell finished without a test result at its chosen LR, else
    None. Its mean leaves them out (it has no value for them), which flatters the cell: the reader is told."""
    if not cell.failed:
        return None
    n = len(cell.tests)
    return f"n={n} of {n + len(cell.failed)}: {failed_text(cell.failed)}"


def _interim(left: RunsLeft | None) -> bool:
    """Whether the spec's plan has runs left for a cell, or may give it more (a pending re-estimation), as
    ``findings`` reads it: its value is not final."""
    return left is not None and bool(left.total or left.reestimate_pending)


def interim_note(left: RunsLeft | None) -> str | None:
    """``interim: 7 planned runs left`` ('+': more follow once its LR search ends, or if the seed count is
    re-estimated upwards) where the plan has runs left for the cell; else None."""
    if not _interim(left):
        return None
    more = bool(left.search) or left.reestimate_pending
    return f"interim: {left.total}{'+' * more} planned run{'s' * (left.total != 1 or more)} left"


def _with_notes(text: str, notes: Sequence[str | None], gives_n: bool) -> str:
    """``text (note; note)``; ``gives_n``: a note states the seed count, so the value's own ``(n=1)`` goes."""
    notes = [n for n in notes if n]
    if not notes:
        return text
    if gives_n and text.endswith(" (n=1)"):
        text = text[: -len(" (n=1)")]
    return f"{text} ({'; '.join(notes)})"


def _unfinished_text(cell: StudyCell) -> str:
    """A cell whose LR search the plan has not finished: its best LR so far, not a result. Checked before
    "diverged": a search whose first runs all diverged has LRs left to try."""
    tried = len(cell.lrs)
    if not cell.tests:
        return f"LR search unfinished ({tried} LR{'s' * (tried > 1)} tried, {'all ' * (tried > 1)}diverged)"
    text = mean_interval(list(cell.tests.values())).text()
    return f"{text}, LR search unfinished (best so far @{cell.lr:.0e} of {tried} LR{'s' * (tried > 1)} tried)"


def _cell_text(cell: StudyCell | None, left: RunsLeft | None = None) -> str:
    """A cell's value, LR and marks: seeds without a test result (``seed_note``), runs left (``interim_note``)."""
    if cell is None:
        return "-"
    if cell.search_unfinished:
        return _unfinished_text(cell)
    if not cell.tests:
        return "diverged"
    text = mean_interval(list(cell.tests.values())).text()
    seeds = seed_note(cell)
    if seeds and text.endswith(" (n=1)"):
        text = text[: -len(" (n=1)")]  # the note states n
    if cell.lr is not None:
        text += f" @{cell.lr:.0e}" + ("†" if cell.at_grid_edge else "")
    return _with_notes(text, [seeds, interim_note(left)], gives_n=True)


def _left_of(left: Left, column: str, label: str) -> RunsLeft | None:
    return left.get((column.split(" [")[0], label))


def _pooled_notes(cells: Sequence[tuple[str, StudyCell]], n: int, lefts: Sequence[RunsLeft | None]) -> list[str]:
    """The marks of a value pooled over ``cells`` ((where, cell) pairs) on ``n`` seeds: the seeds some of them
    lack a test result for (a per-seed average or pairing leaves such a seed out), and "interim" when the plan has
    runs left for any of them."""
    failed = [failed_text(cell.failed, where) for where, cell in cells if cell.failed]
    return ([f"n={n}; " + "; ".join(failed)] if failed else []) + (["interim"] if any(map(_interim, lefts)) else [])


def _columns(rows: dict[str, dict[str, StudyCell]]) -> list[str]:
    return sorted({t for per_task in rows.values() for t in per_task}, key=_column_order)


def _one_per_task(columns: list[str]) -> bool:
    """Whether ``columns`` are distinct tasks: an average over a task run under two protocols would count it twice."""
    return len({c.split(" [")[0] for c in columns}) == len(columns)


def _average_text(label: str, per_task: dict[str, StudyCell], tasks: list[str], left: Left) -> str:
    """The row's task average, per seed over every task (only when every task has a chosen LR and a result)."""
    complete = _one_per_task(tasks) and all(
        t in per_task and per_task[t].tests and not per_task[t].search_unfinished for t in tasks)
    seeds = average_by_seed({t: per_task[t].tests for t in tasks}) if complete else {}
    if not seeds:
        return "-"
    notes = _pooled_notes([(_column_label(t), per_task[t]) for t in tasks], len(seeds),
                          [_left_of(left, t, label) for t in tasks])
    return _with_notes(mean_interval(list(seeds.values())).text(), notes,
                       gives_n=any(per_task[t].failed for t in tasks))


def results_table(model: str, rows: dict[str, dict[str, StudyCell]], left: Left | None = None) -> str:
    """One table: rows method/budget, columns tasks and the task average (paired by seed). ``left``: the runs the
    spec's plan has left per (task, label), marking cells interim (none without a spec)."""
    left = left or {}
    tasks = _columns(rows)
    head = ["Method", *map(_column_label, tasks), "Avg"]
    lines = [f"### {model}", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for label in sorted(rows, key=method_order):
        per_task = rows[label]
        texts = [_cell_text(per_task.get(t), _left_of(left, t, label)) for t in tasks]
        texts.append(_average_text(label, per_task, tasks, left))
        lines.append("| " + " | ".join([label, *texts]) + " |")
    protocols = {}
    for per_task in rows.values():
        for column, cell in per_task.items():
            protocols[column] = cell.key[1]
    lines += ["", "Protocols: " + "; ".join(f"{_column_label(c)}: {protocols[c]}" for c in tasks) + "."]
    return "\n".join(lines)


def _difference_text(a: StudyCell | None, b: StudyCell | None, lefts: Sequence[RunsLeft | None]) -> str:
    """One task's a - b, paired by seed, marked as ``_pooled_notes`` says."""
    shared = a is not None and b is not None and set(a.tests) & set(b.tests)
    if not shared:
        return "-"
    if a.search_unfinished or b.search_unfinished:
        return "LR search unfinished"
    est = paired_difference(a.tests, b.tests)
    return _with_notes(est.text(), _pooled_notes([(a.key[3], a), (b.key[3], b)], est.n, lefts),
                       gives_n=bool(a.failed or b.failed))


def _difference_average(rows: dict[str, dict[str, StudyCell]], left: str, right: str, tasks: list[str],
                        runs_left: Left) -> str:
    """left - right on the per-seed task average, over the tasks both sides have with a chosen LR."""
    both = [t for t in tasks if t in rows[left] and t in rows[right]
            and not (rows[left][t].search_unfinished or rows[right][t].search_unfinished)]
    both = both if _one_per_task(both) else []  # a task under two protocols: no average over "the tasks"
    avg_a = average_by_seed({t: rows[left][t].tests for t in both})
    avg_b = average_by_seed({t: rows[right][t].tests for t in both})
    if not set(avg_a) & set(avg_b):
        return "-"
    est = paired_difference(avg_a, avg_b)
    cells = [(f"{_column_label(t)} {label}", rows[label][t]) for t in both for label in (left, right)]
    notes = _pooled_notes(cells, est.n, [_left_of(runs_left, t, label) for t in both for label in (left, right)])
    return _with_notes(est.text(), notes, gives_n=any(c.failed for _, c in cells))


def difference_table(model: str, rows: dict[str, dict[str, StudyCell]], runs_left: Left | None = None
                     ) -> str | None:
    """left - right per task and on the average, paired by seed, with t intervals (points)."""
    runs_left = runs_left or {}
    tasks = _columns(rows)
    lines = []
    for left, right in DIFFERENCES:
        if left not in rows or right not in rows:
            continue
        texts = [_difference_text(rows[left].get(t), rows[right].get(t),
                                  [_left_of(runs_left, t, left), _left_of(runs_left, t, right)]) for t in tasks]
        texts.append(_difference_average(rows, left, right, tasks, runs_left))
        lines.append("| " + " | ".join([f"{left} − {right}", *texts]) + " |")
    if not lines:
        return None
    head = ["Difference (points)", *map(_column_label, tasks), "Avg"]
    return "\n".join([f"#### Paired differences — {model}", "", "| " + " | ".join(head) + " |",
                      "|---" * len(head) + "|", *lines])


def paper_table(model: str, rows: dict[str, dict[str, StudyCell]], left: Left | None = None) -> str | None:
    """Every row the paper also reports (Table 1/5 and B.1 on OPT-125m), ours beside the paper's, per task; a
    ratio the paper lacks stands beside its nearest (``paper_label``), as on the sparsity curve.

    The paper's columns are its published numbers (``randmask_lab.study.paper``), not runs of this project."""
    left = left or {}
    tasks = [t for t in _columns(rows) if " [" not in t]
    labels = [label for label in sorted(rows, key=method_order)
              if any(paper_value(t, paper_label(label)) is not None and t in rows[label] for t in tasks)]
    if not labels:
        return None
    head = ["Method", "Trainable"]
    for t in tasks:
        head += [f"{_column_label(t)} (this study)", f"{_column_label(t)} (paper)"]
    lines = [f"#### Beside the paper's {PAPER_MODEL} rows — {model}", "", "| " + " | ".join(head) + " |",
             "|---" * len(head) + "|"]
    for label in labels:
        first = next(iter(rows[label].values())).runs[0]
        share = f"{100 * first.trainable / first.total:.3g}%" if first.total else "-"
        texts = [label, share]
        for t in tasks:
            value = paper_value(t, paper_label(label))
            texts += [_cell_text(rows[label].get(t), left.get((t, label))), "-" if value is None else f"{value:.1f}"]
        lines.append("| " + " | ".join(texts) + " |")
    stand_ins = [f"{label} beside {paper_label(label)}" for label in labels if paper_label(label) != label]
    lines += ["", f"Paper: its Table 5 (OPT-125m; {PAPER_PROTOCOL}), verbatim. Trainable: this study's count "
                  "over all of the model's parameters (first run of the row; the paper's ratios are of OPT-125m's)."
              + (f" A ratio the paper lacks stands beside the nearest of its ratios (within {STAND_IN:.0%}): "
                 f"{', '.join(stand_ins)}." if stand_ins else "")]
    return "\n".join(lines)


def far_off_lines(model: str, rows: dict[str, dict[str, StudyCell]]) -> str | None:
    """The seeds far from their cell (``stats.far_off_seeds``), one line each; None when there are none."""
    lines = []
    for label in sorted(rows, key=method_order):
        for column, cell in sorted(rows[label].items(), key=lambda kv: _column_order(kv[0])):
            at = f" @{cell.lr:.0e}" if cell.lr is not None else ""  # zero-shot has no LR
            for f in far_off_seeds(cell.tests):
                lines.append(f"- {_column_label(column)}, {label}{at}: seed {f.seed} at {100 * f.value:.1f} "
                             f"(the cell's median {100 * f.median:.1f}, robust std {100 * f.robust_std:.1f}: "
                             f"z = {f.z:+.0f})")
    if not lines:
        return None
    return "\n".join([f"#### Far-off seeds — {model}", "",
                      f"Seeds more than {FAR_OFF_Z:g} robust standard deviations (1.4826 × the median absolute "
                      "deviation over the cell's seeds) from their cell's median. They are real runs and stay in "
                      "every mean, interval and rule above; the list shows when one run carries a cell's spread.",
                      "", *lines])


NOTE = ("Cells: test metric ×100 as mean ± std over seeds [95% t interval over seeds] @ the chosen LR (by mean "
        "validation loss over the LR-search seeds; † = at the edge of the LR grid; \"LR search unfinished\": the "
        "study's plan still has LRs to try for the cell, so its LR is the best so far and its value is not a result, "
        "known only when the study's spec is given, --spec). Differences are paired by "
        "seed (same data sample, mask and order seeds), with a t interval of the per-seed differences; the "
        "average is taken per seed over the tasks that both sides have.")


# Said only where a table shows such a mark, so a study without one reads as before.
FAILED_NOTE = (" \"n=2 of 3: seed 2 diverged\": seeds that finished without a test result at the chosen LR "
               "(diverged, scale_collapsed) are left out of the mean, the interval and every paired difference and "
               "average, which flatters the side whose run failed; `randmask findings` reads no rule over them.")
INTERIM_NOTE = (" \"interim\": the study's plan has runs left for the cell (\"+\": more follow once its LR search "
                "ends, or if its seed count is re-estimated upwards), so its value is not final.")


def _legend(cells: dict[CellKey, StudyCell], runs_left: Mapping[str, Left]) -> str:
    """The cells' legend, with the explanation of each mark the tables show."""
    interim = any(_interim(runs_left.get(key[0], {}).get((key[2], key[3]))) and not cell.search_unfinished
                  for key, cell in cells.items())
    failed = any(c.failed and not c.search_unfinished for c in cells.values())
    return NOTE + FAILED_NOTE * failed + INTERIM_NOTE * interim


def study_tables(cells: dict[CellKey, StudyCell], runs_left: Mapping[str, Left] | None = None) -> str:
    """Every results table and difference table of the study, Markdown. ``runs_left``: model -> the runs the
    spec's plan has left per (task, method label) (``study.plan.plan_progress(...).runs_left``): those cells are
    marked interim (none given: none known, as without --spec)."""
    if not cells:
        return "No finished runs."
    runs_left = runs_left or {}
    parts: list[str] = []
    for model, rows in sorted(by_model(cells).items()):
        left = runs_left.get(model, {})
        parts.append(results_table(model, rows, left))
        for extra in (difference_table(model, rows, left), paper_table(model, rows, left), far_off_lines(model, rows)):
            if extra:
                parts.append(extra)
    return "\n\n".join(parts) + "\n\n" + _legend(cells, runs_left)
