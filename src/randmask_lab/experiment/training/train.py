"""One run: claim it in the store -> data -> prepared model -> training (loop.py) -> test -> record.

A run is claimed before it starts (a lease in the results store, renewed by a heartbeat), so
workers that share a store and out-dir never run the same cell twice; a run whose worker died is
taken over once its lease expires and resumes from its checkpoint.
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from randmask_lab.errors import RunError
from randmask_lab.experiment.compute.distributed import DistContext, barrier, broadcast_object, init_distributed
from randmask_lab.experiment.compute.precision import slow_precision_warning
from randmask_lab.experiment.parts.assemble import RunParts, assemble, check_names
from randmask_lab.experiment.results.record import RESUMED_NOTE, RunRecord, code_version
from randmask_lab.experiment.results.store import Lease, ResultStore, new_owner, store_file
from randmask_lab.experiment.run.config import RunConfig
from randmask_lab.experiment.training.checkpoint import TrainState
from randmask_lab.experiment.training.loop import LeaseLost, RunInterrupted, Trainer, evaluate
from randmask_lab.fs import write_json
from randmask_lab.machine import machine_info

__all__ = ["LeaseLost", "RunInterrupted", "RunResult", "default_store", "run_training", "store_path"]


def store_path(config: RunConfig) -> Path:
    """The results store file a config names (default: <out_dir>/results.sqlite)."""
    return store_file(config.store, config.out_dir)


def default_store(config: RunConfig) -> ResultStore:
    """The store a config names, created if needed."""
    return ResultStore(store_path(config))


def run_training(config: RunConfig, store: ResultStore | None = None, stop_after: int | None = None,
                 ctx: DistContext | None = None, lease: Lease | None = None) -> RunRecord:
    """Fine-tune one run; return its record (also put in the store and ``<run dir>/record.json``).

    A finished run (done/diverged/scale_collapsed) in the store is returned as is, unless
    ``config.restart``. Without ``lease`` the run is claimed here; a run another live worker holds
    is a RunError. ``stop_after`` (tests) stops as if the process were killed after that many steps.
    """
    spec = check_names(config)
    config = config.resolved()  # auto -> the precision this device runs well: recorded and hashed as such
    ctx = ctx or init_distributed(config.device)
    if config.world_size != ctx.world:  # its batches, hence its result and id, follow the processes it spans
        raise RunError(f"this run's config is for {config.world_size} process(es) (world_size), but it runs on "
                       f"{ctx.world}: launch it with torchrun --nproc-per-node {config.world_size}, or drop world_size "
                       "from its config so that the launch sets it")
    slow = slow_precision_warning(config.precision, ctx.device)
    if slow and ctx.is_main:
        print(f"warning: {slow}", file=sys.stderr)
    if config.threads:
        torch.set_num_threads(config.threads)
    run_id = config.run_id  # once: it hashes the task's data files
    claim = _Claim(config, run_id, store, ctx, lease)
    if claim.finished is not None:
        return claim.finished
    try:
        started = RunResult.start(ctx.device)
        return _run(assemble(config, ctx, spec=spec, run_id=run_id), ctx, claim.store, claim.lease, stop_after,
                    started)
    finally:
        if claim.owned is not None:
            claim.owned.release()


class _Claim:
    """This worker's hold on a run: the store, the lease (``owned``: taken here, released by the caller), and the
    stored record when the run is already finished (broadcast to every rank)."""

    def __init__(self, config: RunConfig, run_id: str, store: ResultStore | None, ctx: DistContext,
                 lease: Lease | None) -> None:
        self.lease, self.owned = lease, None
        finished = None
        if ctx.is_main and lease is None:
            self.store = store or default_store(config)
            finished = self._claim(config, run_id)
        else:
            self.store = store or (default_store(config) if ctx.is_main else None)
        self.finished: RunRecord | None = broadcast_object(finished, ctx)

    def _claim(self, config: RunConfig, run_id: str) -> RunRecord | None:
        store = self.store
        if config.restart:
            store.delete(run_id)
        owner = new_owner()
        claim = store.claim(run_id, owner, config.lease_seconds)
        if claim == "busy":
            held = store.lease(run_id)
            ago = time.time() - held.heartbeat if held else 0.0
            raise RunError(f"run {run_id} is being run by worker {held.owner if held else '?'} (last heartbeat "
                           f"{ago:.0f} s ago); wait for it, or for its lease to expire ({config.lease_seconds:g} s "
                           "after its last heartbeat) if that worker died")
        if claim == "claimed":
            self.lease = self.owned = Lease(store, run_id, owner, config.lease_seconds)
        return store.get(run_id) if claim == "finished" else None


@dataclass
class RunResult:
    """How a run ended, for its record: the training state (history, best epoch), the status, the test metric,
    and the clocks."""

    state: TrainState
    status: str = "done"
    test_metric: float | None = None
    started: float = 0.0
    """Wall clock at the start of this attempt (time.time())."""
    cpu_started: float = 0.0
    """This process's CPU clock then (time.process_time())."""
    train_seconds: float | None = None
    """Training time over every attempt (None: the whole attempt's wall time)."""
    notes: list[str] = field(default_factory=list)
    code: dict = field(default_factory=dict)
    """``code_version`` read at the start: a checkout updated mid-run must not be named as the code that ran."""

    @classmethod
    def start(cls, device: torch.device) -> RunResult:
        """A result whose clocks and code version are taken now."""
        return cls(TrainState(), started=time.time(), cpu_started=time.process_time(), code=code_version(device))


def _run(parts: RunParts, ctx: DistContext, store: ResultStore | None, lease: Lease | None,
         stop_after: int | None, result: RunResult) -> RunRecord:
    config, run_dir = parts.config, parts.run_dir
    if ctx.is_main:
        if config.restart:
            shutil.rmtree(run_dir / "checkpoint", ignore_errors=True)
        write_json(run_dir / "config.json", config.to_dict())
    barrier(ctx)
    if not parts.prepared.trains:  # evaluation only (zeroshot)
        _evaluate_only(parts, ctx, result)
    else:
        _train(parts, ctx, run_dir, lease, stop_after, result)
    return _finish(parts, ctx, store, lease, result)


def _evaluate_only(parts: RunParts, ctx: DistContext, result: RunResult) -> None:
    """The untouched model's validation loss/metric (as epoch 0) and test metric."""
    data, model = parts.data, parts.model
    with_metric = data.spec.kind != "generation" or parts.config.val_generate
    val_loss, val_metric = evaluate(model, parts.objective, parts.plan, ctx, data.val, with_metric)
    result.state = TrainState(history=[{"epoch": 0, "train_loss": None, "val_loss": val_loss,
                                        "val_metric": val_metric}], best_epoch=0)
    result.test_metric = evaluate(model, parts.objective, parts.plan, ctx, data.test, True)[1] if data.test else None


def _train(parts: RunParts, ctx: DistContext, run_dir: Path, lease: Lease | None, stop_after: int | None,
           result: RunResult) -> None:
    """Train (resuming from a checkpoint), then test the best epoch and save its adapter."""
    config, data = parts.config, parts.data
    trainer = Trainer(parts, ctx, run_dir, lease, stop_after, code=result.code)
    outcome = trainer.train()
    result.status, result.state = outcome.status, trainer.state
    if outcome.status == "done" and outcome.best is not None:
        trainer.load_best()
        result.test_metric = trainer.evaluate(data.test, with_metric=True)[1] if data.test else None
        # --fsdp: every rank takes part (sharded tensors are gathered); the files are the same bytes on each.
        if (ctx.is_main or config.fsdp) and config.save_adapter:
            parts.prepared.save(run_dir / "trainable")  # any method, reloadable by the lab
            parts.prepared.save_adapter(run_dir / "adapter")  # the method's own format, where it has one
    result.train_seconds = trainer.state.train_seconds + time.time() - trainer.started
    if trainer.resumed_from is not None:
        result.notes.append(RESUMED_NOTE.format(step=trainer.resumed_from))


def _finish(parts: RunParts, ctx: DistContext, store: ResultStore | None, lease: Lease | None,
            result: RunResult) -> RunRecord:
    config, report, state, run_dir = parts.config, parts.prepared.report, result.state, parts.run_dir
    best = next((h for h in state.history if h["epoch"] == state.best_epoch), {})
    now = time.time()
    record = RunRecord(
        run_id=parts.run_id, config=config.to_dict(), status=result.status,  # type: ignore[arg-type]
        metric=parts.spec.metric, epochs=state.history, best_epoch=state.best_epoch,
        val_loss=best.get("val_loss"), val_metric=best.get("val_metric"), test_metric=result.test_metric,
        trainable=report.trainable, total=report.total, trainable_report=report.to_dict(),
        wall_seconds=round(now - result.started, 2),
        train_seconds=round(result.train_seconds if result.train_seconds is not None else now - result.started, 2),
        cpu_seconds=round(time.process_time() - result.cpu_started, 2),
        # What earlier attempts carried in through the checkpoint (TrainState keeps it; 0 on a fresh start).
        carried_seconds=round(state.train_seconds, 2), carried_cpu_seconds=round(state.cpu_seconds, 2),
        code_version=result.code, earlier_code_versions=[v for v in state.code_versions if v != result.code],
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        notes=[*parts.data.splits.notes, *report.notes, *result.notes], run_dir=str(run_dir),
        data=parts.data_record(), attention=parts.attention, machine=machine_info(ctx.device),
    )
    if ctx.is_main:
        write_json(run_dir / "record.json", record.to_dict())
        (store or default_store(config)).put(record, owner=lease.owner if lease is not None else None)
        shutil.rmtree(run_dir / "checkpoint", ignore_errors=True)  # the record and adapter are the results
    barrier(ctx)
    return record
