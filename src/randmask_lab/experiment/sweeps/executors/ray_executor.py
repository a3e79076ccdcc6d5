"""``randmask sweep --executor ray``: each cell of the grid is one Ray task; the results store stays the
single source of truth, and this driver is its only writer.

Why the driver writes the store and the workers do not: the store is one SQLite file, and SQLite's
locking (and its WAL mode, which needs shared memory) is unreliable on network file systems. So the
driver claims each cell in the store (a lease, renewed by its heartbeat thread) before submitting it,
a worker trains and returns its record as JSON (a few KB), and the driver puts it in the store. Run
folders (checkpoints, steps.csv, adapters) are written by the workers under --out-dir, which on a
cluster must be shared storage at the same path on every node: a retried task may land on another
node and resumes from the checkpoint there.

Faults: a worker killed mid-run makes Ray retry the task (``max_retries``); the retry resumes from the
run's last checkpoint while the driver keeps holding the lease. A killed driver stops renewing its
leases; its runs in flight are lost up to their last checkpoint, and re-running the command (or any
other sweep on the store, once the leases expire) finishes them. Ctrl-C cancels the tasks in flight
and releases their leases.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import time
import traceback
from collections import Counter
from collections.abc import Callable
from typing import Any

from randmask_lab.errors import LabError, MissingPackageError, RunError
from randmask_lab.experiment.results.record import RunRecord, source_folder
from randmask_lab.experiment.results.store import Lease, ResultStore, new_owner
from randmask_lab.experiment.run.config import RunConfig
from randmask_lab.experiment.sweeps.executors.config import ExecutorConfig
from randmask_lab.experiment.sweeps.sweep import SweepConfig, checked_grid, claim_cell, failed_record
from randmask_lab.experiment.training.train import default_store, run_training

__all__ = ["import_ray", "run_sweep_ray"]

EXTRA = "pip install 'randmask[ray]' (or pip install ray)"


def import_ray() -> Any:
    """The ``ray`` module, or a one-line MissingPackageError naming the extra that installs it."""
    try:
        import ray
    except ImportError:
        raise MissingPackageError(f"--executor ray needs Ray, which is not installed: {EXTRA}") from None
    return ray


# -- the worker side ---------------------------------------------------------------------------------


class _RecordSink:
    """Stands in for the store inside a worker: the run's record is kept and returned to the driver."""

    def __init__(self) -> None:
        self.record: RunRecord | None = None

    def put(self, record: RunRecord, owner: str | None = None) -> None:
        self.record = record


class _DriverLease:
    """The driver holds (and renews) the lease; the worker needs its owner name, and ``lost``, which the
    training loop checks every step: it turns True when this worker was orphaned (its raylet died with a
    killed driver that had started a local Ray instance), so the run stops and keeps its checkpoint for the
    re-run instead of racing it. (On a cluster Ray itself kills the tasks of a driver that died.)"""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._parent = os.getppid()  # the raylet that started this worker

    @property
    def lost(self) -> bool:
        return os.getppid() != self._parent


def run_cell(config_json: str, owner: str) -> dict[str, Any]:
    """One cell, in a Ray worker: train (resuming from a checkpoint left by a killed attempt) and return
    ``{"record": <record JSON>, "trace": <traceback tail of an internal error, or "">}``."""
    config = RunConfig.from_dict(json.loads(config_json))
    trace = ""
    try:
        record = run_training(config, store=_RecordSink(), lease=_DriverLease(owner))  # type: ignore[arg-type]
    except Exception as e:  # noqa: BLE001 - a broken run is a failed record, as in a local sweep
        record = failed_record(config, e)
        if not isinstance(e, LabError):
            trace = "".join(traceback.format_exception(e)[-3:]).rstrip()
    return {"record": json.dumps(record.to_dict()), "trace": trace}


# -- the driver side ---------------------------------------------------------------------------------


def _connect(ray: Any, executor: ExecutorConfig) -> bool:
    """Join the cluster named by --ray-address / $RAY_ADDRESS, or start a local instance; True if started here."""
    address = executor.ray_address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return False
    if address:
        _probe(address)
        try:
            ray.init(address=address, log_to_driver=True)
        except (ConnectionError, ValueError, RuntimeError) as e:
            raise RunError(f"cannot join the Ray cluster at {address} ({e}); start it with `ray start --head` "
                           "or pass another --ray-address") from None
        return False
    # A local instance sized to this machine. Its workers import the lab from where this driver does
    # (a source checkout may not be what site-packages holds).
    src = str(source_folder())
    path = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=True,
             logging_level=logging.ERROR, runtime_env={"env_vars": {"PYTHONPATH": path}})
    return True


def _probe(address: str) -> None:
    """A one-line error when nothing listens at a host:port address (ray.init would retry for minutes)."""
    if address in ("auto", "local") or "://" in address:
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except (OSError, ValueError) as e:
        raise RunError(f"no Ray cluster answers at {address} ({e}); start one with `ray start --head` (it prints the "
                       "address to join) or fix --ray-address / RAY_ADDRESS") from None


def _slots(ray: Any, executor: ExecutorConfig) -> int:
    """Runs the cluster can hold at once: cells are claimed only as slots free up, so a concurrent
    sweep on the same store gets the rest of the grid."""
    resources = ray.cluster_resources()
    slots = int(resources.get("CPU", 0) // executor.cpus_per_run)
    if executor.gpus_per_run:
        slots = min(slots, int(resources.get("GPU", 0) // executor.gpus_per_run))
    if slots < 1:
        raise RunError(f"the Ray cluster has {resources.get('CPU', 0):g} CPUs and {resources.get('GPU', 0):g} GPUs: "
                       f"not enough for one run of --cpus-per-run {executor.cpus_per_run:g} --gpus-per-run "
                       f"{executor.gpus_per_run:g}; lower them or add nodes")
    return slots


def _task_config(config: RunConfig, executor: ExecutorConfig) -> RunConfig:
    """The config a worker runs: threads from --cpus-per-run, no progress bar, a device that matches the GPUs
    Ray gave it (only execution fields change, so the run id is the same)."""
    threads = config.threads or max(1, int(executor.cpus_per_run))
    device = config.device
    if device == "auto" and not executor.gpus_per_run:
        device = "cpu"  # a task without GPUs must not pick up a GPU Ray did not give it
    return dataclasses.replace(config, threads=threads, device=device, progress=False, restart=False)


class _Progress:
    """One bar for the grid (done / running / failed / diverged) and a line per event above it."""

    def __init__(self, total: int, show: bool, say: Callable[[str], None]) -> None:
        self.say_fn, self.counts, self.running = say, Counter(), 0
        self.bar = None
        if show:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="grid", unit="run", dynamic_ncols=True)

    def say(self, text: str) -> None:
        if self.bar is None:
            self.say_fn(text)
            return
        with self.bar.external_write_mode():
            self.say_fn(text)

    def update(self, status: str | None = None, running: int | None = None) -> None:
        if status is not None:
            self.counts["done" if status == "done" else status] += 1
        if running is not None:
            self.running = running
        if self.bar is not None:
            self.bar.set_postfix(done=self.counts["done"], running=self.running, failed=self.counts["failed"],
                                 diverged=self.counts["diverged"] + self.counts["scale_collapsed"], refresh=False)
            if status is not None:
                self.bar.update(1)
            else:
                self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclasses.dataclass
class _Driver:
    """The cells of one Ray sweep in flight and finished, and the moves that submit, collect and cancel them."""

    ray: Any
    store: ResultStore
    executor: ExecutorConfig
    ids: list[str]
    owner: str
    progress: _Progress
    task: Any = None
    slots: int = 0
    inflight: dict[Any, tuple[int, RunConfig, Lease]] = dataclasses.field(default_factory=dict)
    results: dict[str, RunRecord] = dataclasses.field(default_factory=dict)
    announced: set[str] = dataclasses.field(default_factory=set)

    def submit(self, pending: list[tuple[int, RunConfig]]) -> list[tuple[int, RunConfig]]:
        """Claim and submit pending cells while slots are free; the cells still waiting (busy or no slot)."""
        waiting = []
        for i, config in pending:
            run_id = self.ids[i - 1]
            if len(self.inflight) >= self.slots:
                waiting.append((i, config))
                continue
            state, record = claim_cell(self.store, config, run_id, self.owner, self.announced, self.progress.say,
                                       f"[{i}/{len(self.ids)}]")
            if state == "finished":
                self.results[run_id] = record  # type: ignore[assignment]
                self.progress.update(record.status if record else "done")
                continue
            if state == "busy":
                waiting.append((i, config))
                continue
            lease = Lease(self.store, run_id, self.owner, config.lease_seconds)
            ref = self.task.remote(json.dumps(_task_config(config, self.executor).to_dict()), self.owner)
            self.inflight[ref] = (i, config, lease)
            self.progress.say(f"[{i}/{len(self.ids)}] submitted {run_id}")
        return waiting

    def collect(self, done: list[Any]) -> list[tuple[int, RunConfig]]:
        """Store the records of finished tasks; the cells whose lease was lost meanwhile (to retry)."""
        retry = []
        for ref in done:
            i, config, lease = self.inflight.pop(ref)
            record = _collect(self.ray, ref, config, self.progress)
            if lease.lost:  # the driver stalled past its lease: the new owner's record counts
                lease.release()
                self.progress.say(f"  lease on {config.run_id} lost to another worker; its result is theirs")
                retry.append((i, config))
                continue
            self.store.put(record, owner=self.owner)
            lease.release()
            self.results[record.run_id] = record
            self.progress.update(record.status, running=len(self.inflight))
            self.progress.say(f"[{i}/{len(self.ids)}] {record.status}: {record.run_id}: test {record.metric} = "
                              f"{record.test_metric}, best epoch {record.best_epoch}, {record.wall_seconds:.0f} s")
        return retry

    def cancel_lost(self) -> list[tuple[int, RunConfig]]:
        """Cancel the tasks whose lease another worker took over; their cells (to retry)."""
        retry = []
        for ref, (i, config, lease) in list(self.inflight.items()):
            if lease.lost:  # taken over by another worker: stop this copy
                self.ray.cancel(ref, force=True)
                del self.inflight[ref]
                lease.release()
                self.progress.say(f"  lease on {config.run_id} lost to another worker; cancelled here")
                retry.append((i, config))
        return retry

    def cancel_all(self) -> None:
        """Stop every task in flight and free its cell (its checkpoints stay, so the next sweep resumes it)."""
        for ref, (_, _, lease) in self.inflight.items():
            self.ray.cancel(ref, force=True)
            lease.release()


def run_sweep_ray(sweep: SweepConfig, base: RunConfig, executor: ExecutorConfig, store: ResultStore | None = None,
                  say: Callable[[str], None] = print, poll_seconds: float | None = None) -> list[RunRecord]:
    """Run every unfinished cell of the grid as a Ray task; the records in grid order (see the module doc)."""
    ray = import_ray()
    configs, ids = checked_grid(sweep, base)  # before any task is submitted
    store = store or default_store(base)
    poll = poll_seconds if poll_seconds is not None else max(0.5, min(10.0, base.lease_seconds / 4))
    owner = new_owner()
    started = _connect(ray, executor)
    driver = _Driver(ray, store, executor, ids, owner, _Progress(len(configs), base.progress, say))
    try:
        driver.slots = _slots(ray, executor)
        driver.task = ray.remote(run_cell).options(num_cpus=executor.cpus_per_run, num_gpus=executor.gpus_per_run,
                                                   max_retries=executor.max_retries, retry_exceptions=False)
        pending = list(enumerate(configs, 1))
        while pending or driver.inflight:
            pending = driver.submit(pending)
            driver.progress.update(running=len(driver.inflight))
            if not driver.inflight:
                if pending:
                    time.sleep(poll)  # every remaining cell is held by another worker
                continue
            done, _ = ray.wait(list(driver.inflight), num_returns=1, timeout=poll)
            pending += driver.collect(done)
            pending += driver.cancel_lost()
    except BaseException:
        # Ctrl-C (or an error in the driver): stop the tasks in flight and free their cells at once.
        driver.cancel_all()
        raise
    finally:
        driver.progress.close()
        if started:
            ray.shutdown()
    return [driver.results[i] for i in ids if i in driver.results]


def _collect(ray: Any, ref: Any, config: RunConfig, progress: _Progress) -> RunRecord:
    """The record a task returned, or a failed record when Ray gave up on it (its worker died too often)."""
    try:
        out = ray.get(ref)
    except ray.exceptions.RayError as e:
        progress.say(f"  failed: {type(e).__name__}: {' '.join(str(e).split())[:300]}")
        return failed_record(config, e)
    record = RunRecord.from_dict(json.loads(out["record"]))
    if record.status == "failed":
        progress.say(f"  failed: {record.error}")
        if out["trace"]:
            progress.say(out["trace"])
    return record
