"""Where a sweep's runs execute: ``local`` (one after another in this process, sweep.run_sweep) or
``ray`` (each run a Ray task, ray_executor.run_sweep_ray). Both claim every run in the results store
first (store.claim), so any mix of local and Ray sweeps on one store runs each cell once.
"""

from __future__ import annotations

from collections.abc import Callable

from randmask_lab.experiment.results.record import RunRecord
from randmask_lab.experiment.results.store import ResultStore
from randmask_lab.experiment.run.config import RunConfig
from randmask_lab.experiment.sweeps.executors.config import ExecutorConfig
from randmask_lab.experiment.sweeps.sweep import SweepConfig, run_sweep

__all__ = ["ExecutorConfig", "run_grid"]


def run_grid(executor: ExecutorConfig, sweep: SweepConfig, base: RunConfig, store: ResultStore | None = None,
             say: Callable[[str], None] = print) -> list[RunRecord]:
    """Run every unfinished cell of the grid with the chosen executor; the records in grid order."""
    executor.validate()
    if executor.executor == "ray":
        from randmask_lab.experiment.sweeps.executors.ray_executor import run_sweep_ray

        return run_sweep_ray(sweep, base, executor, store=store, say=say)
    return run_sweep(sweep, base, store=store, say=say)
