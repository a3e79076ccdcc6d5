"""Where a sweep's runs execute: ``local`` (one after another in this process, sweep.run_sweep) or
``ray`` (each run a Ray task, ray_executor.run_sweep_ray). Both claim every run in the results store
first (store.claim), so any mix of local and Ray sweeps on one store runs each cell once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from randmask_lab.errors import RunError
from randmask_lab.experiment.config import RunConfig
from randmask_lab.experiment.record import RunRecord
from randmask_lab.experiment.store import ResultStore
from randmask_lab.experiment.sweep import SweepConfig, run_sweep

__all__ = ["ExecutorConfig", "run_grid"]


@dataclass
class ExecutorConfig:
    """How a sweep executes its runs (the grid and the runs themselves are SweepConfig and RunConfig)."""

    executor: Literal["local", "ray"] = "local"
    """local: run the cells one after another in this process. ray: submit each cell as a Ray task, to a local
    Ray instance or a cluster (needs pip install 'randmask[ray]')."""
    cpus_per_run: float = 1.0
    """Ray: CPUs reserved per run; a run uses this many torch threads unless --threads is given."""
    gpus_per_run: float = 0.0
    """Ray: GPUs reserved per run (Ray sets CUDA_VISIBLE_DEVICES for it)."""
    ray_address: str | None = None
    """Ray: the cluster to join (what `ray start --head` prints, e.g. 10.0.0.1:6379); default $RAY_ADDRESS, else a
    local Ray instance sized to this machine. On a cluster --out-dir must be shared storage mounted at the same
    path on every node (checkpoints and adapters go there); the results store is written by this driver only."""
    max_retries: int = 3
    """Ray: times a run is retried when its worker process dies (it resumes from its last checkpoint)."""

    def validate(self) -> None:
        """RunError for values no executor can use."""
        if self.cpus_per_run <= 0:
            raise RunError(f"--cpus-per-run must be > 0, got {self.cpus_per_run:g}")
        if self.gpus_per_run < 0:
            raise RunError(f"--gpus-per-run must be >= 0, got {self.gpus_per_run:g}")
        if self.max_retries < 0:
            raise RunError(f"--max-retries must be >= 0, got {self.max_retries}")
        if self.executor == "local" and (self.ray_address or self.cpus_per_run != 1.0 or self.gpus_per_run):
            raise RunError("--ray-address / --cpus-per-run / --gpus-per-run apply to --executor ray only")


def run_grid(executor: ExecutorConfig, sweep: SweepConfig, base: RunConfig, store: ResultStore | None = None,
             say: Callable[[str], None] = print) -> list[RunRecord]:
    """Run every unfinished cell of the grid with the chosen executor; the records in grid order."""
    executor.validate()
    if executor.executor == "ray":
        from randmask_lab.experiment.executors.ray_executor import run_sweep_ray

        return run_sweep_ray(sweep, base, executor, store=store, say=say)
    return run_sweep(sweep, base, store=store, say=say)
