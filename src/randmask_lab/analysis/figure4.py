"""`randmask figure4`: the paper's Figure 4 from the JSON files the analysis commands wrote.

λ_max comes from ``hessian.json`` or ``suggest_lr.json`` (the same power iteration), distance from
``distance.json``; each file's ``run`` block says what was measured (method, budget, trained or not).
A ``hessian.json`` measured with ``--which magnitude`` gives the Hessian norm ‖H‖₂ = max |λ| (the
paper's "norm of the hessian ... using the power method"); one folder should not mix the two. Rows are per
(method, budget), so the files must all be of one task and one model (a mix is refused, never pooled as seeds).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from randmask import read_json_limited
from randmask_lab.analysis.plots import plot_distance, plot_lambda_max
from randmask_lab.analysis.result_fields import ResultFields, refuse_mixed
from randmask_lab.errors import RunError

RESULT_FILES = ("hessian.json", "suggest_lr.json", "distance.json")
MAX_RESULT_BYTES = 256 << 20  # a result JSON: a few numbers and a power-iteration trace
FIX = "delete it and run its measurement again"
MAX_COUNT = 1 << 53  # no model comes near; a larger "count" is damage (and n_trainable / n_total could overflow)


def _budget(run: dict[str, Any]) -> float:
    """Trainable share of all parameters: the run's ratio, else the measured count (full FT, LoRA)."""
    return float(run["ratio"]) if run.get("ratio") is not None else run["n_trainable"] / run["n_total"]


def seed_mean(values: list[float]) -> float:
    """Geometric mean of positive values (Hessian norms and distances spread over orders of magnitude
    between seeds, and are plotted on log axes), else the arithmetic mean."""
    if all(v > 0 for v in values):
        return math.exp(statistics.fmean(math.log(v) for v in values))
    return statistics.fmean(values)


def _checked_run(fields: ResultFields, data: Any) -> dict[str, Any]:
    """The file's ``run`` block, every field ``collect`` reads checked (type, finite, range)."""
    if not isinstance(data, dict):
        raise fields.damaged("the top level", data, "not an analysis result")
    run = data.get("run")
    if run is not None and not isinstance(run, dict):
        raise fields.damaged("run", run, "not a run block")
    if not run or "method" not in run:
        raise RunError(f"{fields.path} has no 'run' block (written by an older randmask); run the command again")
    if not isinstance(run["method"], str) or not run["method"]:
        raise fields.damaged("run.method", run["method"], "not a method name")
    for key in ("task", "model"):
        fields.optional(f"run.{key}", run.get(key), str)
    fields.optional("run.trained", run.get("trained"), bool)
    if run.get("seed") is not None:
        fields.number("run.seed", run["seed"], low=0, integer=True)
    if run.get("ratio") is not None:
        fields.number("run.ratio", run["ratio"], above=0, high=1)
    total = fields.number("run.n_total", run.get("n_total"), above=0, high=MAX_COUNT, integer=True)
    fields.number("run.n_trainable", run.get("n_trainable"), above=0, high=total, integer=True)
    return run


def _measurement(fields: ResultFields, data: dict[str, Any]) -> tuple[str, float, str | None]:
    """(row key, value, quantity) of one result file: ``distance``, or λ ``before`` / ``after`` training with
    "norm" or "top" (what the λ is); the value checked finite (and a distance non-negative)."""
    if fields.path.name == "distance.json":
        return "distance", fields.number("total", data.get("total"), low=0), None
    which = data.get("which", "top")
    if which not in ("top", "magnitude"):
        raise fields.damaged("which", which, 'not "top" or "magnitude"')
    value = fields.number("lambda_max", data.get("lambda_max"))
    name = "after" if data["run"].get("trained") else "before"
    if which == "magnitude":  # signed dominant eigenvalue: its size is ‖H‖₂
        return name, abs(value), "norm"
    return name, value, "top"


def _read_results(folders: Iterable[str | Path]) -> list[tuple[ResultFields, dict[str, Any], dict[str, Any]]]:
    """``(its field checks, data, run block)`` of every result file under ``folders``, each checked; a mix of tasks
    or models refused before any is pooled."""
    found = []
    for folder in folders:
        for path in sorted(p for name in RESULT_FILES for p in Path(folder).rglob(name)):
            data = read_json_limited(path, MAX_RESULT_BYTES, "analysis result", error=RunError, fix=FIX)
            fields = ResultFields(path, FIX)
            found.append((fields, data, _checked_run(fields, data)))
    refuse_mixed([(str(fields.path), run) for fields, _, run in found],
                 {"task": "pass only the folders of one task", "model": "pass only the folders of one model"},
                 "figure4")
    return found


def collect(folders: Iterable[str | Path]) -> list[dict[str, Any]]:
    """One row per (method, budget): ``before`` / ``after`` λ_max and ``distance``, from every result file found.

    Measurements of several seeds (the ``run`` block's ``seed``: mask and batch sample) of one
    (method, budget) are kept per seed in ``<key>_by_seed`` ({seed: value}); ``<key>`` is ``seed_mean`` of them.
    All files must be of one task and one model (RunError otherwise), or rows would pool them as seeds.
    """
    rows: dict[tuple[str, float], dict[str, Any]] = {}
    quantities: set[str] = set()
    for fields, data, run in _read_results(folders):
        path = fields.path
        name, value, quantity = _measurement(fields, data)
        key = (run["method"], _budget(run))
        row = rows.setdefault(key, {"method": run["method"], "ratio": key[1], "task": run.get("task"),
                                    "n_trainable": run["n_trainable"]})
        if quantity:
            row["quantity"] = quantity
            quantities.add(quantity)
        by_seed = row.setdefault(f"{name}_by_seed", {})
        seed = run.get("seed") or 0
        if seed in by_seed:
            raise RunError(f"{path}: a second {name} measurement of {key[0]} at {key[1]:.3g}, seed {seed}; "
                           "keep one folder per (cell, seed).")
        by_seed[seed] = value
        if "localization" in data:
            row.setdefault(f"{name}_where_by_seed", {})[seed] = _checked_localization(path, data["localization"])
        row[name] = seed_mean(list(by_seed.values()))
    if len(quantities) > 1:
        raise RunError("the folders mix top-eigenvalue and Hessian-norm (--which magnitude) results; "
                       "measure every cell the same way.")
    return sorted(rows.values(), key=lambda r: (r["method"], -r["ratio"]))


def _checked_localization(path: Path, loc: Any) -> dict[str, Any]:
    """``loc`` if it has what ``localization_markdown`` reads; else a RunError naming the file."""
    top = loc.get("top_entries") if isinstance(loc, dict) else None
    first = top[0] if isinstance(top, list) and top else None
    if not (isinstance(first, dict) and isinstance(first.get("param"), str)
            and isinstance(first.get("share"), (int, float)) and isinstance(loc.get("participation"), (int, float))):
        raise RunError(f"{path}: its 'localization' block is damaged (no participation or top entry); delete the "
                       "file and run its measurement again")
    return loc


def _quantity(rows: list[dict[str, Any]]) -> str:
    """"norm" (max |λ|) or "top" (largest eigenvalue): what the rows' λ values are (``collect`` refuses a mix)."""
    return next((r["quantity"] for r in rows if "quantity" in r), "top")


def markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table; a value over n seeds is their ``seed_mean`` and says "(n=…)"."""

    def fmt(row: dict[str, Any], key: str) -> str:
        if row.get(key) is None:
            return "-"
        n = len(row.get(f"{key}_by_seed", ()))
        return f"{row[key]:.4g}" + (f" (n={n})" if n > 1 else "")

    name = "‖H‖₂" if _quantity(rows) == "norm" else "λ_max"
    lines = [f"| Method | Trainable | Share | {name} before | {name} after | Distance |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['n_trainable']:,} | {100 * r['ratio']:.4g}% | {fmt(r, 'before')} | "
                     f"{fmt(r, 'after')} | {fmt(r, 'distance')} |")
    if any(len(r.get(f"{k}_by_seed", ())) > 1 for r in rows for k in ("before", "after", "distance")):
        lines.append("\n(n=…): the geometric mean over n seeds (arithmetic where a value is <= 0; each seed: its own "
                     "mask, batch and run).")
    return "\n".join(lines)


# Path components that say nothing in a table cell (module containers, adapter plumbing).
WRAPPER_NAMES = {"base_model", "model", "layers", "h", "layer", "encoder", "decoder", "self_attn", "attention", "mlp",
                 "values", "weight", "default", "base_layer"}


def _short_param(name: str) -> str:
    """``model.layers.1.self_attn.v_proj.adapters.default.values`` -> ``L1 v_proj`` (a table cell)."""
    parts, out, skip_next = name.split("."), [], False
    for part in parts:
        if skip_next:
            skip_next = False
        elif part == "adapters":
            skip_next = True  # and the adapter's name
        elif part.isdigit():
            out.append(f"L{part}")
        elif part not in WRAPPER_NAMES:
            out.append(part)
    return " ".join(out) or name


def _where(loc: dict[str, Any]) -> str:
    top = loc["top_entries"][0]
    at = (f"out {top['out_feature']}, in {top['in_feature']}" if "in_feature" in top
          else f"row {top['row']}, col {top['col']}" if "row" in top else f"#{top['index']}")
    return f"{loc['participation']:.3g}: {_short_param(top['param'])} [{at}] {100 * top['share']:.0f}%"


def localization_markdown(rows: list[dict[str, Any]]) -> str:
    """Where each measurement's top direction lives, one row per (method, budget, state), one column per seed:
    the effective number of entries, and the largest entry with its share of ‖v‖². Empty if none say."""
    if not any(r.get(f"{k}_where_by_seed") for r in rows for k in ("before", "after")):
        return ""
    seeds = sorted({s for r in rows for k in ("before", "after") for s in r.get(f"{k}_by_seed", {})})
    lines = ["| Method | Share | State | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|---|---:|---|" + "---|" * len(seeds)]
    for r in rows:
        for state in ("before", "after"):
            where = r.get(f"{state}_where_by_seed", {})
            if where:  # a cell measured before hessian.json said where is left out
                cells = [_where(where[s]) if s in where else "-" for s in seeds]
                lines.append(f"| {r['method']} | {100 * r['ratio']:.4g}% | {state} | " + " | ".join(cells) + " |")
    lines.append("\nEach cell ('-': a seed's file predates this record): the effective number of entries the "
                 "eigenvector spreads over (1 / Σ v_i⁴ for a unit v), then its largest entry (a masked entry: output "
                 "and input feature of its weight) and that entry's share of ‖v‖².")
    return "\n".join(lines)


def figure4(folders: Iterable[str | Path], out: str | Path) -> tuple[list[dict[str, Any]], list[Path]]:
    """Collect the results under ``folders``; draw lambda_max.png and distance.png into ``out``."""
    folders = list(folders)  # read twice: by collect, and by the message when nothing is found
    rows = collect(folders)
    if not rows:
        missing = [str(f) for f in folders if not Path(f).is_dir()]
        where = f" ({', '.join(missing)}: no such folder)" if missing else ""
        raise RunError(f"no {', '.join(RESULT_FILES)} under {list(map(str, folders))}{where}; pass the --out folders "
                       "of `randmask hessian`, `suggest-lr` or `distance`")
    task = next((r["task"] for r in rows if r.get("task")), "") or ""
    files = []
    if any("before" in r or "after" in r for r in rows):
        files.append(plot_lambda_max(rows, Path(out) / "lambda_max.png", task=task, norm=_quantity(rows) == "norm"))
    if any("distance" in r for r in rows):
        files.append(plot_distance(rows, Path(out) / "distance.png", task=task))
    return rows, files
