"""`randmask calibrate-lr`: fit suggest-lr's Adam factor to the best LRs of a sweep.

Pairs each ``suggest_lr.json`` (made at calibration 1, with its ``run`` block) with the stored
cell of the same task, method and budget, and reports best / suggested per pair, the fitted factor
(their geometric mean) and its spread. The factor to pass as ``randmask suggest-lr --calibration``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from randmask import read_limited
from randmask_lab.analysis.suggest_lr import calibrate
from randmask_lab.errors import RunError
from randmask_lab.experiment.results.report import best_runs, method_label
from randmask_lab.experiment.results.store import ResultStore


def calibration_pairs(folders: list[Path], store: ResultStore, task: str) -> list[dict[str, Any]]:
    """One row per suggestion that has a matching swept cell: label, λ_max, suggested (factor 1), best LR."""
    best = {method_label(r.config): r.config["lr"] for r in best_runs(store.records(task=task))}
    rows = []
    for path in sorted(p for folder in folders for p in Path(folder).rglob("suggest_lr.json")):
        try:
            data = json.loads(read_limited(path, 1 << 20, "suggest-lr result", error=RunError,
                                           fix="delete it and run suggest-lr again"))
        except (ValueError, RecursionError) as e:
            raise RunError(f"{path} is not valid JSON ({str(e)[:80]}); delete it and run suggest-lr again") from None
        if not isinstance(data, dict):
            raise RunError(f"{path} is not a suggest-lr result; delete it and run suggest-lr again")
        run = data.get("run") or {}
        if run.get("task") != task:
            continue
        label = method_label(run)
        if label not in best:
            continue
        suggested = data["adam_lr"] / data["calibration"]  # at factor 1
        rows.append({"label": label, "lambda_max": data["lambda_max"], "suggested": suggested,
                     "best": best[label], "ratio": best[label] / suggested, "file": str(path)})
    if not rows:
        raise RunError(f"no suggest_lr.json under {[str(f) for f in folders]} matches a {task!r} cell of {store.path}")
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
