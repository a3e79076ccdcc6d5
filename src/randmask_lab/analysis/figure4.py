"""`randmask figure4`: the paper's Figure 4 from the JSON files the analysis commands wrote.

λ_max comes from ``hessian.json`` or ``suggest_lr.json`` (the same power iteration), distance from
``distance.json``; each file's ``run`` block says what was measured (method, budget, trained or not).
A ``hessian.json`` measured with ``--which magnitude`` gives the Hessian norm ‖H‖₂ = max |λ| (the
paper's "norm of the hessian ... using the power method"); one folder should not mix the two.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from randmask import read_limited
from randmask_lab.analysis.plots import plot_distance, plot_lambda_max
from randmask_lab.errors import RunError

RESULT_FILES = ("hessian.json", "suggest_lr.json", "distance.json")
MAX_RESULT_BYTES = 256 << 20  # a result JSON: a few numbers and a power-iteration trace


def _budget(run: dict[str, Any]) -> float:
    """Trainable share of all parameters: the run's ratio, else the measured count (full FT, LoRA)."""
    return float(run["ratio"]) if run.get("ratio") else run["n_trainable"] / run["n_total"]


def seed_mean(values: list[float]) -> float:
    """Geometric mean of positive values (Hessian norms and distances spread over orders of magnitude
    between seeds, and are plotted on log axes), else the arithmetic mean."""
    if all(v > 0 for v in values):
        return math.exp(statistics.fmean(math.log(v) for v in values))
    return statistics.fmean(values)


def collect(folders: Iterable[str | Path]) -> list[dict[str, Any]]:
    """One row per (method, budget): ``before`` / ``after`` λ_max and ``distance``, from every result file found.

    Measurements of several seeds (the ``run`` block's ``seed``: mask and batch sample) of one
    (method, budget) are kept per seed in ``<key>_by_seed`` ({seed: value}); ``<key>`` is ``seed_mean`` of them.
    """
    rows: dict[tuple[str, float], dict[str, Any]] = {}
    quantities: set[str] = set()
    for folder in folders:
        for path in sorted(p for name in RESULT_FILES for p in Path(folder).rglob(name)):
            try:
                data = json.loads(read_limited(path, MAX_RESULT_BYTES, "analysis result", error=RunError,
                                               fix="delete it and run its measurement again"))
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
                raise RunError(f"{path} is not valid JSON ({e}); delete it and run its measurement again") from None
            run = data.get("run") if isinstance(data, dict) else None
            if not run or "method" not in run:
                raise RunError(f"{path} has no 'run' block (written by an older randmask); run the command again")
            key = (run["method"], _budget(run))
            row = rows.setdefault(key, {"method": run["method"], "ratio": key[1], "task": run.get("task"),
                                        "n_trainable": run["n_trainable"]})
            if path.name == "distance.json":
                name, value = "distance", data["total"]
            else:
                norm = data.get("which") == "magnitude"  # signed dominant eigenvalue: its size is ‖H‖₂
                name = "after" if run.get("trained") else "before"
                value = abs(data["lambda_max"]) if norm else data["lambda_max"]
                row["quantity"] = "norm" if norm else "top"
                quantities.add(row["quantity"])
            by_seed = row.setdefault(f"{name}_by_seed", {})
            seed = int(run.get("seed") or 0)
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
