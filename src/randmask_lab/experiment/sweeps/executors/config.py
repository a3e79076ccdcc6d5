"""ExecutorConfig: how a sweep executes its runs (``--executor``, ``--cpus-per-run``...)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from randmask_lab.errors import RunError


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
