"""`randmask main`: the default comparison on real offline assets, printed as a paper-style table.

all-MiniLM-L6-v2 + a classification head on SST-2 (GLUE files in ../shared/data): Random
Masking at three budgets (0.1%, 0.01%, 0.001% of all parameters) vs LoRA vs full fine-tuning,
each at the best learning rate of a 3-point grid, chosen by validation loss as in the paper.
The reduced protocol fits in about 15 minutes on 2 CPU cores; ``--full-protocol`` runs the
paper's sizes (1000 train / 500 val / up to 1000 test, 5 epochs, 3 seeds).

Head mode needs a fresh classification head (BERT's pooler + classifier, 148,610 parameters),
trained in every method. It trains at one fixed LR (1e-3) so that each method's own LR grid,
which reaches 3e-1 for the sparsest masks, measures the method and not a head blown up by it.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from randmask_lab.experiment.results.record import RunRecord
from randmask_lab.experiment.results.report import best_cell, method_label
from randmask_lab.experiment.run.config import RunConfig
from randmask_lab.experiment.sweeps.sweep import masking_lrs
from randmask_lab.experiment.training.train import default_store, run_training


@dataclass(frozen=True)
class Protocol:
    """Sizes of the main job's runs."""

    n_train: int
    n_val: int
    n_test: int
    epochs: int
    seeds: tuple[int, ...]

    def describe(self) -> str:
        return (f"{self.n_train} train / {self.n_val} val (from SST-2 train) / {self.n_test} test (SST-2 "
                f"validation), {self.epochs} epochs, batch 8, constant LR, AdamW, seeds {list(self.seeds)}")


REDUCED = Protocol(n_train=500, n_val=200, n_test=872, epochs=3, seeds=(0,))
FULL = Protocol(n_train=1000, n_val=500, n_test=1000, epochs=5, seeds=(0, 1, 2))
MODEL, TASK, HEAD_LR = "minilm-l6", "sst2", 1e-3
# (method, ratio, LR grid): masking grids follow the paper's trend (sparser mask, larger LR).
ENTRIES: tuple[tuple[str, float | None, tuple[float, ...]], ...] = (
    ("full", None, (1e-5, 3e-5, 1e-4)),
    ("lora", None, (3e-4, 1e-3, 3e-3)),
    *(("randmask", r, masking_lrs(r)) for r in (1e-3, 1e-4, 1e-5)),
)


def main_configs(protocol: Protocol, out_dir: str, **options: object) -> list[RunConfig]:
    """Every run of the main job."""
    # No checkpoints: a killed main job skips its finished runs and restarts the current one (~1 min).
    base = RunConfig(model=MODEL, task=TASK, n_train=protocol.n_train, n_val=protocol.n_val,
                     n_test=protocol.n_test, epochs=protocol.epochs, head_lr=HEAD_LR, out_dir=out_dir,
                     eval_batch_size=64, checkpoint_every=-1, **options)  # type: ignore[arg-type]
    return [dataclasses.replace(base, method=method, trainable_ratio=ratio, lr=lr, seed=seed)
            for method, ratio, lrs in ENTRIES for lr in lrs for seed in protocol.seeds]


def comparison_table(records: list[RunRecord]) -> str:
    """Markdown: one row per method/budget; test accuracy at the LR with the best validation loss."""
    rows: dict[str, list[RunRecord]] = defaultdict(list)
    for r in records:
        rows[method_label(r.config)].append(r)
    lines = ["| Method | Trainable (method) | SST-2 test acc. | Best LR | Test acc. at each LR (* = chosen) |",
             "|---|---|---|---|---|"]
    for label, runs in rows.items():
        cell = best_cell(runs, "val_loss")
        own = sum(v for k, v in runs[0].trainable_report.get("groups", {}).items() if k != "head")
        by_lr: dict[float, list[float]] = defaultdict(list)
        for r in runs:
            by_lr[r.config["lr"]].append(r.test_metric if r.test_metric is not None else float("nan"))
        grid = ", ".join(f"{lr:.0e}: {_pct(v)}{'*' if lr == cell.lr else ''}" for lr, v in sorted(by_lr.items()))
        best_lr = f"{cell.lr:.0e}" if cell.lr is not None else "-"
        acc = _pct(cell.tests) + (f" ±{100 * statistics.stdev(cell.tests):.1f}" if len(cell.tests) > 1 else "")
        lines.append(f"| {label} | {own:,} ({100 * own / runs[0].total:.4g}%) | {acc} | {best_lr} | {grid} |")
    return "\n".join(lines)


def _pct(values: list[float]) -> str:
    finite = [v for v in values if v == v]  # NaN marks a diverged run
    return f"{100 * statistics.fmean(finite):.1f}" if finite else "div."


def run_main_job(full_protocol: bool = False, out_dir: str = "runs/main", data_dir: str | None = None,
                 threads: int | None = None, progress: bool = True, say: Callable[[str], None] = print) -> str:
    """Run (or resume) the main job and print the comparison table; returns the table's text."""
    protocol = FULL if full_protocol else REDUCED
    configs = main_configs(protocol, out_dir, data_dir=data_dir, threads=threads, progress=progress)
    say(f"randmask main: {MODEL} + classification head on SST-2, {len(configs)} runs "
        f"({'paper protocol' if full_protocol else 'reduced protocol; --full-protocol for the paper'}'s).")
    say(f"protocol: {protocol.describe()}")
    store = default_store(configs[0])
    started = time.time()
    records = []
    for i, config in enumerate(configs, 1):
        t = time.time()
        record = run_training(config, store=store)
        records.append(record)
        acc = "diverged" if record.test_metric is None else f"{100 * record.test_metric:.1f}"
        say(f"[{i:2d}/{len(configs)}] {method_label(record.config):<16} lr {config.lr:.0e} seed {config.seed}: "
            f"test acc {acc}, best epoch {record.best_epoch} ({time.time() - t:.0f} s)")
    table = comparison_table(records)
    minutes = (time.time() - started) / 60
    head = records[0].trainable_report.get("groups", {}).get("head", 0)
    say("")
    say(table)
    say("")
    say(f"Protocol: {protocol.describe()}. Each cell: mean test accuracy over seeds at the LR whose mean "
        f"validation loss is lowest; the epoch with the lowest validation loss is used. The task head "
        f"(pooler + classifier, {head:,} parameters) trains in every method at LR {HEAD_LR:g}; 'Trainable "
        f"(method)' excludes it. Results store: {store.path}. Wall time: {minutes:.1f} min.")
    return table
