"""The study's Markdown tables: mean ± std [95% t interval] over seeds, and paired differences."""

from __future__ import annotations

from collections import defaultdict

from randmask_lab.experiment.results.report import TASK_LABELS, method_order, task_order
from randmask_lab.study.cells import CellKey, StudyCell
from randmask_lab.study.paper import PAPER_MODEL, PAPER_PROTOCOL, paper_value
from randmask_lab.study.stats import FAR_OFF_Z, average_by_seed, far_off_seeds, mean_interval, paired_difference

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


def _cell_text(cell: StudyCell | None) -> str:
    if cell is None:
        return "-"
    if not cell.tests:
        return "diverged"
    text = mean_interval(list(cell.tests.values())).text()
    if cell.search_unfinished:
        tried = len(cell.lrs)
        return f"{text}, LR search unfinished (best so far @{cell.lr:.0e} of {tried} LR{'s' * (tried > 1)} tried)"
    if cell.lr is not None:
        text += f" @{cell.lr:.0e}" + ("†" if cell.at_grid_edge else "")
    return text


def _columns(rows: dict[str, dict[str, StudyCell]]) -> list[str]:
    return sorted({t for per_task in rows.values() for t in per_task}, key=_column_order)


def _one_per_task(columns: list[str]) -> bool:
    """Whether ``columns`` are distinct tasks: an average over a task run under two protocols would count it twice."""
    return len({c.split(" [")[0] for c in columns}) == len(columns)


def results_table(model: str, rows: dict[str, dict[str, StudyCell]]) -> str:
    """One table: rows method/budget, columns tasks and the task average (paired by seed)."""
    tasks = _columns(rows)
    head = ["Method", *map(_column_label, tasks), "Avg"]
    lines = [f"### {model}", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for label in sorted(rows, key=method_order):
        per_task = rows[label]
        texts = [_cell_text(per_task.get(t)) for t in tasks]
        complete = _one_per_task(tasks) and all(
            t in per_task and per_task[t].tests and not per_task[t].search_unfinished for t in tasks)
        seeds = average_by_seed({t: per_task[t].tests for t in tasks}) if complete else {}
        texts.append(mean_interval(list(seeds.values())).text() if seeds else "-")
        lines.append("| " + " | ".join([label, *texts]) + " |")
    protocols = {}
    for per_task in rows.values():
        for column, cell in per_task.items():
            protocols[column] = cell.key[1]
    lines += ["", "Protocols: " + "; ".join(f"{_column_label(c)}: {protocols[c]}" for c in tasks) + "."]
    return "\n".join(lines)


def difference_table(model: str, rows: dict[str, dict[str, StudyCell]]) -> str | None:
    """left - right per task and on the average, paired by seed, with t intervals (points)."""
    tasks = _columns(rows)
    lines = []
    for left, right in DIFFERENCES:
        if left not in rows or right not in rows:
            continue
        texts = []
        for t in tasks:
            a, b = rows[left].get(t), rows[right].get(t)
            shared = a is not None and b is not None and set(a.tests) & set(b.tests)
            unfinished = shared and (a.search_unfinished or b.search_unfinished)
            texts.append("LR search unfinished" if unfinished else
                         paired_difference(a.tests, b.tests).text() if shared else "-")
        both = [t for t in tasks if t in rows[left] and t in rows[right]
                and not (rows[left][t].search_unfinished or rows[right][t].search_unfinished)]
        both = both if _one_per_task(both) else []  # a task under two protocols: no average over "the tasks"
        avg_a = average_by_seed({t: rows[left][t].tests for t in both})
        avg_b = average_by_seed({t: rows[right][t].tests for t in both})
        texts.append(paired_difference(avg_a, avg_b).text() if set(avg_a) & set(avg_b) else "-")
        lines.append("| " + " | ".join([f"{left} − {right}", *texts]) + " |")
    if not lines:
        return None
    head = ["Difference (points)", *map(_column_label, tasks), "Avg"]
    return "\n".join([f"#### Paired differences — {model}", "", "| " + " | ".join(head) + " |",
                      "|---" * len(head) + "|", *lines])


def paper_table(model: str, rows: dict[str, dict[str, StudyCell]]) -> str | None:
    """Every row the paper also reports (Table 1/5 and B.1 on OPT-125m), ours beside the paper's, per task.

    The paper's columns are its published numbers (``randmask_lab.study.paper``), not runs of this project."""
    tasks = [t for t in _columns(rows) if " [" not in t]
    labels = [label for label in sorted(rows, key=method_order)
              if any(paper_value(t, label) is not None and t in rows[label] for t in tasks)]
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
            value = paper_value(t, label)
            texts += [_cell_text(rows[label].get(t)), "-" if value is None else f"{value:.1f}"]
        lines.append("| " + " | ".join(texts) + " |")
    lines += ["", f"Paper: its Table 5 (OPT-125m; {PAPER_PROTOCOL}), verbatim. Trainable: this study's count "
                  "over all of the model's parameters (first run of the row; the paper's ratios are of OPT-125m's)."]
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


def study_tables(cells: dict[CellKey, StudyCell]) -> str:
    """Every results table and difference table of the study, Markdown."""
    if not cells:
        return "No finished runs."
    parts: list[str] = []
    for model, rows in sorted(by_model(cells).items()):
        parts.append(results_table(model, rows))
        for extra in (difference_table(model, rows), paper_table(model, rows), far_off_lines(model, rows)):
            if extra:
                parts.append(extra)
    return "\n\n".join(parts) + "\n\n" + NOTE
