"""`randmask calibrate-lr`: fit suggest-lr's Adam factor to the best LRs of a sweep.

Pairs each ``suggest_lr.json`` (made at calibration 1, with its ``run`` block) with the stored
cell of the same task, method, budget and model, and reports best / suggested per pair, the fitted factor
(their geometric mean) and its spread. The factor to pass as ``randmask suggest-lr --calibration``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from randmask import read_json_limited
from randmask_lab.analysis.result_fields import ResultFields
from randmask_lab.analysis.suggest_lr import calibrate
from randmask_lab.errors import RunError
from randmask_lab.experiment.results.report import best_runs, method_label
from randmask_lab.experiment.results.store import ResultStore, protocol_label

FIX = "delete it and run suggest-lr again"


def _positive(fields: ResultFields, field: str, value: Any, high: float | None = None) -> float:
    """``value`` if a finite number in (0, ``high``]: a 0 calibration divides by zero, a NaN or negative LR
    poisons the fitted factor (a geometric mean), so each is refused by name."""
    return float(fields.number(field, value, above=0, high=high))


def _checked_suggestion(path: Path, data: Any) -> dict[str, Any]:
    """The fields ``calibration_pairs`` reads, checked (types, finite, ranges); a RunError naming the file else."""
    fields = ResultFields(path, FIX)
    if not isinstance(data, dict):
        raise fields.damaged("the top level", data, "not a suggest-lr result")
    run = data.get("run")
    if not isinstance(run, dict):
        raise fields.damaged("run", run, "not a run block")
    for key in ("task", "method"):
        if not isinstance(run.get(key), str) or not run[key]:
            raise fields.damaged(f"run.{key}", run.get(key), "not a name")
    fields.optional("run.model", run.get("model"), str)
    fields.optional("run.method_options", run.get("method_options"), dict)
    for key in ("ratio", "density"):
        if run.get(key) is not None:
            _positive(fields, f"run.{key}", run[key], high=1)
    # The LR at factor 1, what the fit scales; a quotient of two valid numbers can still under/overflow.
    suggested = (_positive(fields, "adam_lr", data.get("adam_lr"))
                 / _positive(fields, "calibration", data.get("calibration")))
    _positive(fields, "adam_lr / calibration", suggested)
    return {"run": run, "suggested": suggested, "lambda_max": _positive(fields, "lambda_max", data.get("lambda_max"))}


def _best_lr(path: Path, run: dict[str, Any], cells: list[dict[str, Any]]) -> float | None:
    """The best swept LR of the store cell this suggestion was measured on: same task (already filtered), method
    and budget (the label), method options and model; None (with a note) if the store has no such cell. A file
    from before suggest-lr recorded the model or the options matches any. The suggestion does not record the
    sweep's protocol: cells of several protocols (or options) with different best LRs are refused, not guessed."""
    model, options = run.get("model"), run.get("method_options")
    same = [c for c in cells if (model is None or c["model"] == model) and (options is None or c["options"] == options)]
    if not same:
        others = sorted({_cell_name(c) for c in cells})
        on = "any model" if model is None else f"model {model!r}"
        print(f"note: skipped {path}: the store has no {method_label(run)}{_options_text(options)} cell on {on}"
              + (f" (only on {', '.join(others)})" if others else ""), file=sys.stderr)
        return None
    lrs = {c["lr"] for c in same}
    if len(lrs) > 1:
        where = "; ".join(sorted(f"{_cell_name(c)} ({c['protocol']}): {c['lr']:g}" for c in same))
        raise RunError(f"{path}: the store has several {method_label(run)} cells with different best LRs ({where}); "
                       "pass a store of one protocol (--store), or run suggest-lr again so the file names its model "
                       "and method options")
    return lrs.pop()


def _options_text(options: dict[str, Any] | None) -> str:
    return f" {json.dumps(options, sort_keys=True)}" if options else ""


def _cell_name(cell: dict[str, Any]) -> str:
    """The cell's model, and its method options where it has any: ``'tiny' {"r": 16}``."""
    return f"{cell['model']!r}{_options_text(cell['options'])}"


def calibration_pairs(folders: list[Path], store: ResultStore, task: str) -> list[dict[str, Any]]:
    """One row per suggestion that has a matching swept cell: label, λ_max, suggested (factor 1), best LR.

    A suggestion is paired with the best LR of the cell of its own task, method, budget, method options and model,
    never with another model's (the LR scale differs between models); unmatched ones are skipped with a note on stderr.
    """
    cells: dict[str, list[dict[str, Any]]] = {}
    for r in best_runs(store.records(task=task)):
        cells.setdefault(method_label(r.config), []).append(
            {"model": r.config["model"], "protocol": protocol_label(r.config), "lr": r.config["lr"],
             "options": r.config.get("method_options") or {}})
    rows, other_tasks = [], 0
    for path in sorted(p for folder in folders for p in Path(folder).rglob("suggest_lr.json")):
        data = read_json_limited(path, 1 << 20, "suggest-lr result", error=RunError, fix=FIX)
        checked = _checked_suggestion(path, data)
        run = checked["run"]
        if run["task"] != task:
            other_tasks += 1
            continue
        label = method_label(run)
        best = _best_lr(path, run, cells.get(label, []))
        if best is None:
            continue
        rows.append({"label": label, "lambda_max": checked["lambda_max"], "suggested": checked["suggested"],
                     "best": best, "ratio": best / checked["suggested"], "file": str(path)})
    if other_tasks:
        print(f"note: skipped {other_tasks} suggest_lr.json of tasks other than {task!r}", file=sys.stderr)
    if not rows:
        raise RunError(f"no suggest_lr.json under {[str(f) for f in folders]} matches a {task!r} cell (task, "
                       f"method, budget and model) of {store.path}; run suggest-lr on a model and cell of the sweep")
    return rows


def calibration_report(rows: list[dict[str, Any]]) -> str:
    """Markdown table of the pairs, then the fitted factor and spread."""
    lines = ["| Method | λ_max | Suggested LR (factor 1) | Best swept LR | Best / suggested |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['lambda_max']:.4g} | {r['suggested']:.3g} | {r['best']:g} "
                     f"| {r['ratio']:.3g} |")
    factor, spread = calibrate([r["suggested"] for r in rows], [r["best"] for r in rows])
    lines += ["", f"Fitted calibration factor (geometric mean of best / suggested): {factor:.3g}; "
              f"spread: x{spread:.3g} (the largest pair's deviation from it; the suggested range is "
              f"x{10 ** 0.5:.3g} either side)."]
    return "\n".join(lines)
