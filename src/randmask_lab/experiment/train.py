"""One run: data -> prepared model -> epochs (val loss each) -> best epoch's test metric -> record.

Protocol (the paper's appendix B.1): AdamW (0.9, 0.999, eps 1e-8), constant LR, 5 epochs,
batch 8; the epoch with the lowest validation loss is kept and its test metric reported.
Seeds: data (sampling), mask (masks and every method's random init), order (shuffling,
dropout). A non-finite loss ends the run as ``diverged``. A killed run resumes from its last
checkpoint and replays the same steps (same order, same RNG), so it ends where an
uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

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
)
from randmask_lab.experiment.checkpoint import (
    TrainState,
    load_checkpoint,
    load_trainable,
    save_checkpoint,
    trainable_tensors,
)
from randmask_lab.experiment.config import RunConfig
from randmask_lab.experiment.data import epoch_order, micro_batches, step_batches
from randmask_lab.experiment.distributed import (
    DistContext,
    any_rank,
    barrier,
    broadcast_object,
    gather_shards,
    init_distributed,
    shard,
    wrap_ddp,
)
from randmask_lab.experiment.record import RunRecord, code_version
from randmask_lab.experiment.steps import StepLog, build_optimizer, lr_factor, orth_penalty, set_lr
from randmask_lab.experiment.store import ResultStore, store_file


class RunInterrupted(RuntimeError):
    """Raised by ``run_training(stop_after=N)``: the run stopped as if killed after N steps."""


def store_path(config: RunConfig) -> Path:
    """The results store file a config names (default: <out_dir>/results.sqlite)."""
    return store_file(config.store, config.out_dir)


def default_store(config: RunConfig) -> ResultStore:
    """The store a config names, created if needed."""
    return ResultStore(store_path(config))


def run_training(config: RunConfig, store: ResultStore | None = None, stop_after: int | None = None,
                 ctx: DistContext | None = None) -> RunRecord:
    """Fine-tune one run; return its record (also put in the store and ``<run dir>/record.json``).

    A finished run (done/diverged) in the store is returned as is when ``config.resume``.
    ``stop_after`` (tests) stops as if the process were killed after that many optimizer steps.
    """
    spec = check_names(config)
    ctx = ctx or init_distributed(config.device)
    if config.threads:
        torch.set_num_threads(config.threads)
    if store is None and ctx.is_main and store_path(config).is_file():
        store = default_store(config)
    finished = store.get(config.run_id) if store is not None and config.resume else None
    finished = broadcast_object(finished if finished and finished.status != "failed" else None, ctx)
    if finished is not None:
        return finished
    return _Run(config, spec, ctx, store, stop_after).run()


class _Run:
    """The state of one run in progress (a plain holder for the training loop's pieces)."""

    def __init__(self, config: RunConfig, spec: Any, ctx: DistContext, store: ResultStore | None,
                 stop_after: int | None) -> None:
        self.config, self.ctx, self.store, self.stop_after = config, ctx, store, stop_after
        self.started = time.time()
        self.run_dir = Path(config.out_dir) / config.run_id
        mode = resolve_mode(config, spec)
        self.zero_shot = config.method == "zeroshot"
        if self.zero_shot and mode == "head":
            raise RunError("method 'zeroshot' needs prompt scoring (--mode lm): in head mode the classifier is "
                           "untrained, so its score is chance, not the model's zero-shot ability")
        splits = sample_splits(config, spec)
        model, self.tokenizer = load_model(config, spec, mode)
        self.data = load_data(config, spec, mode, self.tokenizer, splits)
        self.heads = run_head_modules(config, model)
        self.steps_per_epoch = len(self._batches(0))
        self.prepared = prepare(config, model, total_steps=self.steps_per_epoch * config.epochs)
        self.model = self.prepared.model.to(ctx.device)
        self.objective = make_objective(config, self.data, self.tokenizer)
        self.optimizer = None if self.zero_shot else build_optimizer(self.prepared, config, self.heads)
        torch.manual_seed(config.seeds[2])  # dropout stream: the order seed (saved in checkpoints)
        self.state, self.best = TrainState(), None
        self.ckpt = self.run_dir / "checkpoint"
        if not config.resume and ctx.is_main:
            shutil.rmtree(self.ckpt, ignore_errors=True)
        barrier(ctx)
        resumable = config.resume and self.optimizer is not None
        loaded = load_checkpoint(self.ckpt, self.model, self.optimizer, config.run_id) if resumable else None
        if loaded is not None:
            self.state, self.best = loaded
        self.ddp = wrap_ddp(self.model, ctx)
        self.log = StepLog(self.run_dir / "steps.csv" if ctx.is_main else None, self.state.global_step)
        self.steps_here = 0

    def _batches(self, epoch: int) -> list[list[int]]:
        order = epoch_order(len(self.data.train), self.config.seeds[2], epoch)
        batches = step_batches(order, self.config.batch_size, self.ctx.world, self.ctx.rank)
        return batches[: self.config.max_steps] if self.config.max_steps else batches

    def run(self) -> RunRecord:
        if self.ctx.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(json.dumps(self.config.to_dict(), indent=1) + "\n")
        if self.zero_shot:
            return self._zero_shot()
        status = "done" if self._train() else "diverged"
        test_metric = None
        if status == "done" and self.best is not None:
            load_trainable(self.model, self.best)
            test_metric = self.evaluate(self.data.test, with_metric=True)[1] if self.data.test else None
            if self.ctx.is_main and self.config.save_adapter:
                self._save_adapter()
        return self._finish(status, test_metric)

    def _zero_shot(self) -> RunRecord:
        """Evaluate the untouched model: validation (recorded as epoch 0, the one selected) and test."""
        val_loss, val_metric = self.evaluate(self.data.val, self._val_metric())
        self.state.history.append({"epoch": 0, "train_loss": None, "val_loss": val_loss, "val_metric": val_metric})
        self.state.best_epoch = 0
        test_metric = self.evaluate(self.data.test, with_metric=True)[1] if self.data.test else None
        return self._finish("done", test_metric)

    def _train(self) -> bool:
        """All epochs from the current state; False when the loss stopped being finite."""
        config, state = self.config, self.state
        if config.eval_initial and state.global_step == 0 and not state.history:
            loss, metric = self.evaluate(self.data.val, self._val_metric())
            state.history.append({"epoch": 0, "train_loss": None, "val_loss": loss, "val_metric": metric})
        for epoch in range(state.epoch, config.epochs):
            batches = self._batches(epoch)
            bar = tqdm(total=len(batches), initial=state.step_in_epoch, desc=f"epoch {epoch + 1}/{config.epochs}",
                       disable=not (config.progress and self.ctx.is_main), leave=False)
            for b in range(state.step_in_epoch, len(batches)):
                loss = self.step(batches[b])
                if any_rank(not math.isfinite(loss), self.ctx):
                    bar.close()
                    return False
                self._after_step(epoch, b, len(batches), loss)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
            bar.close()
            if not self._end_epoch(epoch):
                return False
        return True

    def step(self, indices: list[int]) -> float:
        """One optimizer step over this process's examples ``indices``; returns their mean loss."""
        micro = micro_batches(indices, self.config.grad_accum)
        total, value = len(indices), 0.0
        self.model.train()
        for j, mb in enumerate(micro):
            sync = j == len(micro) - 1 or not self.ctx.active
            with contextlib.nullcontext() if sync else self.ddp.no_sync():
                loss = self.objective.loss(self.ddp, [self.data.train[i] for i in mb])
                penalty = orth_penalty(self.model)
                if penalty is not None:
                    loss = loss + penalty
                (loss * (len(mb) / total)).backward()
            value += loss.item() * len(mb) / total
        if math.isfinite(value):
            factor = lr_factor(self.state.global_step, self.steps_per_epoch * self.config.epochs,
                               self.config.warmup_steps, self.config.schedule)
            set_lr(self.optimizer, factor)
            self.optimizer.step()
            if self.prepared.on_step is not None:
                self.prepared.on_step(self.state.global_step)
        self.optimizer.zero_grad(set_to_none=True)
        return value

    def _after_step(self, epoch: int, b: int, n_batches: int, loss: float) -> None:
        state = self.state
        state.global_step += 1
        state.step_in_epoch = b + 1
        state.loss_sum += loss
        state.loss_count += 1
        self.log.write(state.global_step, epoch + 1, loss, self.optimizer.param_groups[0]["lr"],
                       state.train_seconds + time.time() - self.started)
        every = self.config.checkpoint_every
        if every > 0 and state.global_step % every == 0 and b + 1 < n_batches:
            self._checkpoint()
        self.steps_here += 1
        if self.stop_after is not None and self.steps_here >= self.stop_after:
            raise RunInterrupted(f"stopped after {self.steps_here} steps (stop_after)")

    def _end_epoch(self, epoch: int) -> bool:
        state, config = self.state, self.config
        val_loss, val_metric = self.evaluate(self.data.val, self._val_metric())
        if not math.isfinite(val_loss):
            return False
        state.history.append({"epoch": epoch + 1, "train_loss": state.loss_sum / max(1, state.loss_count),
                              "val_loss": val_loss, "val_metric": val_metric, "steps": state.global_step,
                              "seconds": round(state.train_seconds + time.time() - self.started, 2)})
        if config.progress and self.ctx.is_main:
            metric = "n/a" if val_metric is None else f"{val_metric:.4f}"
            tqdm.write(f"epoch {epoch + 1}/{config.epochs}: train loss {state.history[-1]['train_loss']:.4f}, "
                       f"val loss {val_loss:.4f}, val {self.data.spec.metric} {metric}")
        score = val_loss if config.select_by == "val_loss" or val_metric is None else -val_metric
        if state.best_score is None or score < state.best_score:
            state.best_score, state.best_epoch = score, epoch + 1
            self.best = trainable_tensors(self.model)
        state.epoch, state.step_in_epoch, state.loss_sum, state.loss_count = epoch + 1, 0, 0.0, 0
        self._checkpoint()
        return True

    def _val_metric(self) -> bool:
        return self.data.spec.kind != "generation" or self.config.val_generate

    def _checkpoint(self) -> None:
        if self.config.checkpoint_every < 0:
            return
        if self.ctx.is_main:
            seconds = self.state.train_seconds
            self.state.train_seconds = seconds + time.time() - self.started
            save_checkpoint(self.ckpt, self.state, self.model, self.optimizer, self.best, self.config.run_id)
            self.state.train_seconds = seconds
        barrier(self.ctx)

    def evaluate(self, items: list[Any], with_metric: bool) -> tuple[float, float | None]:
        """(mean loss, metric or None) over ``items``, split across ranks."""
        self.model.eval()
        mine = shard(len(items), self.ctx)
        losses, preds = self.objective.evaluate(self.model, [items[i] for i in mine], with_metric)
        losses = gather_shards(losses, len(items), self.ctx)
        loss = sum(losses) / len(losses) if losses else float("nan")
        if preds is None:
            return loss, None
        return loss, self.objective.metric(gather_shards(preds, len(items), self.ctx), items)

    def _save_adapter(self) -> None:
        """Trainable tensors (any method, reloadable here) plus the method's own format."""
        self.prepared.save(self.run_dir / "trainable")
        name = self.config.method
        if name in ("randmask", "structured"):
            from randmask import save_adapter

            save_adapter(self.model, self.run_dir / "adapter")
        elif name in ("lora", "adalora", "prefix"):
            self.model.save_pretrained(str(self.run_dir / "adapter"))

    def _finish(self, status: str, test_metric: float | None) -> RunRecord:
        state, report = self.state, self.prepared.report
        best = next((h for h in state.history if h["epoch"] == state.best_epoch), {})
        record = RunRecord(
            run_id=self.config.run_id, config=self.config.to_dict(), status=status,  # type: ignore[arg-type]
            metric=self.data.spec.metric, epochs=state.history, best_epoch=state.best_epoch,
            val_loss=best.get("val_loss"), val_metric=best.get("val_metric"), test_metric=test_metric,
            trainable=report.trainable, total=report.total, trainable_report=report.to_dict(),
            wall_seconds=round(time.time() - self.started, 2),
            train_seconds=round(state.train_seconds + time.time() - self.started, 2),
            code_version=code_version(), created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            notes=[*self.data.splits.notes, *report.notes], run_dir=str(self.run_dir),
        )
        if self.ctx.is_main:
            (self.run_dir / "record.json").write_text(json.dumps(record.to_dict(), indent=1) + "\n")
            (self.store or default_store(self.config)).put(record)
            shutil.rmtree(self.ckpt, ignore_errors=True)  # the record and adapter are the results
        barrier(self.ctx)
        return record
