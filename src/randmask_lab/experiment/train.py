"""One run: claim it in the store -> data -> prepared model -> training (loop.py) -> test -> record.

A run is claimed before it starts (a lease in the results store, renewed by a heartbeat), so
workers that share a store and out-dir never run the same cell twice; a run whose worker died is
taken over once its lease expires and resumes from its checkpoint.
"""

from __future__ import annotations

import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from randmask_lab.errors import RunError
from randmask_lab.experiment.build import (
    check_names,
    load_data,
    load_model,
    make_objective,
    prepare,
    resolve_mode,
    run_head_modules,
    sample_splits,
    split_record,
)
from randmask_lab.experiment.checkpoint import TrainState
from randmask_lab.experiment.config import RunConfig
from randmask_lab.experiment.distributed import DistContext, barrier, broadcast_object, init_distributed
from randmask_lab.experiment.loop import LeaseLost, RunInterrupted, Trainer, evaluate
from randmask_lab.experiment.precision import PrecisionPlan, slow_precision_warning
from randmask_lab.experiment.record import RESUMED_NOTE, RunRecord, code_version
from randmask_lab.experiment.store import Lease, ResultStore, new_owner, store_file
from randmask_lab.machine import machine_info
from randmask_lab.methods.trainable import write_json

__all__ = ["LeaseLost", "RunInterrupted", "default_store", "run_training", "store_path"]


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
    slow = slow_precision_warning(config.precision, ctx.device)
    if slow and ctx.is_main:
        print(f"warning: {slow}", file=sys.stderr)
    if config.threads:
        torch.set_num_threads(config.threads)
    run_id = config.run_id
    owned = None
    if ctx.is_main and lease is None:
        store = store or default_store(config)
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
            lease = owned = Lease(store, run_id, owner, config.lease_seconds)
        finished = store.get(run_id) if claim == "finished" else None
    else:
        store = store or (default_store(config) if ctx.is_main else None)
        finished = None
    finished = broadcast_object(finished, ctx)
    if finished is not None:
        return finished
    try:
        return _run(config, spec, ctx, store, lease, stop_after)
    finally:
        if owned is not None:
            owned.release()


def _run(config: RunConfig, spec: Any, ctx: DistContext, store: ResultStore | None, lease: Lease | None,
         stop_after: int | None) -> RunRecord:
    started = time.time()
    info: dict[str, Any] = {"cpu_started": time.process_time()}
    run_dir = Path(config.out_dir) / config.run_id
    mode = resolve_mode(config, spec)
    plan = PrecisionPlan(config.precision, ctx.device)
    splits = sample_splits(config, spec)
    model, tokenizer = load_model(config, spec, mode, dtype=plan.weight_dtype, device=ctx.device)
    attention = plan.setup_attention(model)
    data = load_data(config, spec, mode, tokenizer, splits)
    heads = run_head_modules(config, model)
    steps = _steps_per_epoch(config, len(data.train), ctx)
    prepared = prepare(config, model, total_steps=steps * config.epochs)
    if prepared.needs_prompts and mode == "head":
        raise RunError(f"method {config.method!r} needs prompt scoring (--mode lm): in head mode the classifier is "
                       "untrained, so its score is chance, not the model's zero-shot ability")
    prepared.model.to(ctx.device)
    plan.cast_trainable(prepared.model, prepared.fp32_trainable)
    objective = make_objective(config, data, tokenizer)
    if ctx.is_main:
        if config.restart:
            shutil.rmtree(run_dir / "checkpoint", ignore_errors=True)
        write_json(run_dir / "config.json", config.to_dict())
    barrier(ctx)
    info.update(data=split_record(config, spec, splits), attention=attention)
    if not prepared.trains:  # evaluation only (zeroshot)
        with_metric = data.spec.kind != "generation" or config.val_generate
        val_loss, val_metric = evaluate(prepared.model, objective, plan, ctx, data.val, with_metric)
        state = TrainState(history=[{"epoch": 0, "train_loss": None, "val_loss": val_loss, "val_metric": val_metric}],
                           best_epoch=0)
        test = evaluate(prepared.model, objective, plan, ctx, data.test, True)[1] if data.test else None
        return _finish(config, ctx, store, lease, prepared, data, state, "done", test, started, info)
    trainer = Trainer(config, prepared, data, objective, heads, plan, ctx, run_dir, lease, stop_after)
    outcome = trainer.train()
    test_metric = None
    if outcome.status == "done" and outcome.best is not None:
        trainer.load_best()
        test_metric = trainer.evaluate(data.test, with_metric=True)[1] if data.test else None
        # --fsdp: every rank takes part (sharded tensors are gathered); the files are the same bytes on each.
        if (ctx.is_main or config.fsdp) and config.save_adapter:
            prepared.save(run_dir / "trainable")  # any method, reloadable by the lab
            prepared.save_adapter(run_dir / "adapter")  # the method's own format, where it has one
    info["train_seconds"] = trainer.state.train_seconds + time.time() - trainer.started
    if trainer.resumed_from is not None:
        info["notes"] = [RESUMED_NOTE.format(step=trainer.resumed_from)]
    return _finish(config, ctx, store, lease, prepared, data, trainer.state, outcome.status, test_metric, started,
                   info)


def _steps_per_epoch(config: RunConfig, n_train: int, ctx: DistContext) -> int:
    world = ctx.world
    step = config.batch_size * world
    n = n_train // step if world > 1 else -(-n_train // step)
    return min(n, config.max_steps) if config.max_steps else n


def _finish(config: RunConfig, ctx: DistContext, store: ResultStore | None, lease: Lease | None, prepared: Any,
            data: Any, state: TrainState, status: str, test_metric: float | None, started: float,
            info: dict[str, Any]) -> RunRecord:
    report = prepared.report
    run_dir = Path(config.out_dir) / config.run_id
    best = next((h for h in state.history if h["epoch"] == state.best_epoch), {})
    record = RunRecord(
        run_id=config.run_id, config=config.to_dict(), status=status,  # type: ignore[arg-type]
        metric=data.spec.metric, epochs=state.history, best_epoch=state.best_epoch,
        val_loss=best.get("val_loss"), val_metric=best.get("val_metric"), test_metric=test_metric,
        trainable=report.trainable, total=report.total, trainable_report=report.to_dict(),
        wall_seconds=round(time.time() - started, 2),
        train_seconds=round(info.get("train_seconds", time.time() - started), 2),
        cpu_seconds=round(time.process_time() - info["cpu_started"], 2),
        # What earlier attempts carried in through the checkpoint (TrainState keeps it; 0 on a fresh start).
        carried_seconds=round(state.train_seconds, 2), carried_cpu_seconds=round(state.cpu_seconds, 2),
        code_version=code_version(ctx.device), created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        notes=[*data.splits.notes, *report.notes, *info.get("notes", [])], run_dir=str(run_dir), data=info["data"],
        attention=info["attention"], machine=machine_info(ctx.device),
    )
    if ctx.is_main:
        write_json(run_dir / "record.json", record.to_dict())
        (store or default_store(config)).put(record, owner=lease.owner if lease is not None else None)
        shutil.rmtree(run_dir / "checkpoint", ignore_errors=True)  # the record and adapter are the results
    barrier(ctx)
    return record
