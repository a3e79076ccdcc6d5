"""`randmask curves`: validation score per epoch of stored runs (the paper's longer-training study, Fig. 4b).

Run a long, small-LR sweep (e.g. ``randmask sweep --epochs 20 --lrs 1e-3 1e-2 --eval-initial``), then
``randmask curves --task sst2`` plots each run's validation metric and loss against the epoch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from randmask_lab.analysis.plots import plot_epoch_curves
from randmask_lab.analysis.result_fields import refuse_mixed
from randmask_lab.errors import RunError
from randmask_lab.experiment.results.record import RunRecord
from randmask_lab.experiment.results.report import method_label
from randmask_lab.experiment.results.settings import row_labels
from randmask_lab.experiment.results.store import ResultStore, protocol_label


def epoch_curves(records: list[RunRecord]) -> dict[str, list[tuple[int, Any, Any]]]:
    """``{"<method budget> lr <lr> s<seed>": [(epoch, val_metric, val_loss), ...]}`` for finished runs of one task,
    model and protocol (a RunError naming the mix otherwise: curves of two tasks shared labels, and one silently
    replaced the other under the first one's title). Runs of other settings (``report``'s rows) keep them apart."""
    finished = [r for r in records if r.status in ("done", "diverged") and r.epochs]
    refuse_mixed([(f"run {r.run_id}", {**r.config, "protocol": protocol_label(r.config)}) for r in finished],
                 {"task": "pass --task", "model": "pass --model",
                  "protocol": "pass --method, or keep one protocol's runs in the store"}, "curves")
    labels = row_labels(finished, method_label, protocol_label)
    curves: dict[str, list[tuple[int, Any, Any]]] = {}
    for r in sorted(finished, key=lambda r: (labels[id(r)], r.config["lr"], r.config["seed"])):
        label = f"{labels[id(r)]} lr {r.config['lr']:g} s{r.config['seed']}"
        if label in curves:
            raise RunError(f"two runs are both {label!r} (another copy of the data or model): keep one in the store")
        curves[label] = [(e["epoch"], e.get("val_metric"), e.get("val_loss")) for e in r.epochs]
    return curves


def write_curves(store: ResultStore, out: str | Path, **where: Any) -> tuple[Path, dict[str, list]]:
    """Plot the epoch curves of the runs in ``store`` matching ``where`` to ``out`` (a PNG path)."""
    records = store.records(**where)
    curves = epoch_curves(records)
    if not curves:
        raise RunError(f"no finished runs in {store.path} match {where or 'the filters'}")
    finished = [r for r in records if r.status in ("done", "diverged") and r.epochs]
    metric = next(r.metric for r in finished if r.metric)
    task = finished[0].config["task"]  # the one task of them all (epoch_curves)
    return plot_epoch_curves(curves, out, metric=metric, title=f"Validation score per epoch — {task}"), curves
