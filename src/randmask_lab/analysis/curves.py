"""`randmask curves`: validation score per epoch of stored runs (the paper's longer-training study, Fig. 4b).

Run a long, small-LR sweep (e.g. ``randmask sweep --epochs 20 --lrs 1e-3 1e-2 --eval-initial``), then
``randmask curves --task sst2`` plots each run's validation metric and loss against the epoch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from randmask_lab.analysis.plots import plot_epoch_curves
from randmask_lab.errors import RunError
from randmask_lab.experiment.results.record import RunRecord
from randmask_lab.experiment.results.report import method_label
from randmask_lab.experiment.results.store import ResultStore


def epoch_curves(records: list[RunRecord]) -> dict[str, list[tuple[int, Any, Any]]]:
    """``{"<method budget> lr <lr> s<seed>": [(epoch, val_metric, val_loss), ...]}`` for finished runs."""
    curves = {}
    for r in sorted(records, key=lambda r: (method_label(r.config), r.config["lr"], r.config["seed"])):
        if r.status not in ("done", "diverged") or not r.epochs:
            continue
        label = f"{method_label(r.config)} lr {r.config['lr']:g} s{r.config['seed']}"
        curves[label] = [(e["epoch"], e.get("val_metric"), e.get("val_loss")) for e in r.epochs]
    return curves


def write_curves(store: ResultStore, out: str | Path, **where: Any) -> tuple[Path, dict[str, list]]:
    """Plot the epoch curves of the runs in ``store`` matching ``where`` to ``out`` (a PNG path)."""
    records = store.records(**where)
    curves = epoch_curves(records)
    if not curves:
        raise RunError(f"no finished runs in {store.path} match {where or 'the filters'}")
    metric = next(r.metric for r in records if r.metric)
    task = where.get("task") or records[0].config["task"]
    return plot_epoch_curves(curves, out, metric=metric, title=f"Validation score per epoch — {task}"), curves
