"""The training loop of one run: epochs, steps, checkpoints, evaluation. It never names a method:
what differs between methods comes from the ``PreparedModel`` (extra loss terms, the per-step hook,
method state for checkpoints, the adapter format).

Protocol (the paper's appendix B.1): AdamW (0.9, 0.999, eps 1e-8), constant LR, 5 epochs,
batch 8; the epoch with the lowest validation loss is kept and its test metric reported.
Seeds: data (sampling), mask (masks and every method's random init), order (shuffling,
dropout). A non-finite loss ends the run as ``diverged``; a collapsed fp16 loss scale as
``scale_collapsed``. A killed run resumes from its last checkpoint and replays the same steps
(same order, same RNG), so it ends where an uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from randmask_lab.experiment.compute.distributed import (
    DistContext,
    any_rank,
    barrier,
    gather_shards,
    shard,
    wrap_ddp,
    wrap_fsdp,
)
from randmask_lab.experiment.compute.precision import PrecisionPlan, ScaleCollapsed, check_scale
from randmask_lab.experiment.parts.assemble import RunParts
from randmask_lab.experiment.parts.data import epoch_batches, grouping_lengths, micro_batches
from randmask_lab.experiment.results.store import Lease
from randmask_lab.experiment.training.checkpoint import (
    TrainState,
    check_counters,
    load_checkpoint,
    save_checkpoint,
)
from randmask_lab.experiment.training.checkpoint_shards import as_dtensors, is_sharded, trainable_copy
from randmask_lab.experiment.training.steps import StepLog, build_optimizer, lr_factor, set_lr
from randmask_lab.methods.trainable import load_trainable


class RunInterrupted(RuntimeError):
    """Raised by ``run_training(stop_after=N)``: the run stopped as if killed after N steps."""


class LeaseLost(RuntimeError):
    """This worker's lease on the run expired and another worker took the run over."""


@dataclass
class Outcome:
    """How training ended: status, and the best epoch's trainable tensors (None if none)."""

    status: str
    best: dict[str, torch.Tensor] | None


class Trainer:
    """Trains a run's prepared model (``build.assemble``) on its data with its objective; evaluates with the same
    objective."""

    def __init__(self, parts: RunParts, ctx: DistContext, run_dir: Path, lease: Lease | None = None,
                 stop_after: int | None = None, code: dict[str, Any] | None = None) -> None:
        """``code``: this attempt's ``code_version``, added to the state's (and so the checkpoints') list."""
        config, prepared, data = parts.config, parts.prepared, parts.data
        self.config, self.prepared, self.data, self.objective = config, prepared, data, parts.objective
        self.plan, self.ctx, self.lease, self.stop_after = parts.plan, ctx, lease, stop_after
        self.model, self.run_id = prepared.model, parts.run_id
        self.loss_fn = parts.loss()  # task loss + the method's terms (AdaLoRA's penalty)
        self.started, self.cpu_started = time.time(), time.process_time()
        # Each item's padded width, for --group-by-length (None: the plain shuffled order).
        self.lengths = grouping_lengths(data.train, config.group_by_length)
        self.steps_per_epoch = len(self._batches(0))
        if config.fsdp:  # before the optimizer: fully_shard replaces the parameters with sharded ones, in place
            self.ddp = wrap_fsdp(self.model, ctx, config.method)
        self.optimizer = build_optimizer(prepared, config, parts.heads)
        self.scaler = self.plan.make_scaler()
        torch.manual_seed(config.seeds.order)  # dropout stream: the order seed (saved in checkpoints)
        self.state, self.best = TrainState(), None
        self.ckpt = run_dir / "checkpoint"
        loaded = load_checkpoint(self.ckpt, prepared, self.optimizer, self.run_id, self.scaler)
        self.resumed_from = None
        if loaded is not None:
            self.state, self.best = loaded
            check_counters(self.state, self.ckpt, config.epochs, self.steps_per_epoch)
            self.resumed_from = self.state.global_step
        if code and self.state.code_versions[-1:] != [code]:  # checkpoints carry it to the next attempt
            self.state.code_versions.append(code)
        self.ddp = wrap_ddp(self.model, ctx) if not config.fsdp else self.ddp
        self.log = StepLog(run_dir / "steps.csv" if ctx.is_main else None, self.state.global_step)
        self.steps_here = 0

    def _batches(self, epoch: int) -> list[list[int]]:
        batches = epoch_batches(len(self.data.train), self.config.seeds.order, epoch, self.config.batch_size,
                                self.ctx.world, self.ctx.rank, self.lengths)
        return batches[: self.config.max_steps] if self.config.max_steps else batches

    def train(self) -> Outcome:
        """All epochs from the current state; the status is done, diverged or scale_collapsed."""
        config, state = self.config, self.state
        if config.eval_initial and state.global_step == 0 and not state.history:
            loss, metric = self.evaluate(self.data.val, self.val_metric)
            state.history.append({"epoch": 0, "train_loss": None, "val_loss": loss, "val_metric": metric})
        try:
            for epoch in range(state.epoch, config.epochs):
                if not self._epoch(epoch):
                    return Outcome("diverged", None)
        except ScaleCollapsed as e:
            state.history.append({"epoch": state.epoch + 1, "note": str(e)})
            return Outcome("scale_collapsed", None)
        return Outcome("done", self.best)

    def _epoch(self, epoch: int) -> bool:
        batches = self._batches(epoch)
        bar = tqdm(total=len(batches), initial=self.state.step_in_epoch, desc=f"epoch {epoch + 1}/{self.config.epochs}",
                   disable=not (self.config.progress and self.ctx.is_main), leave=False)
        try:
            for b in range(self.state.step_in_epoch, len(batches)):
                loss = self.step(batches[b])
                if any_rank(not math.isfinite(loss), self.ctx):
                    return False
                self._after_step(epoch, b, len(batches), loss)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
        finally:
            bar.close()
        return self._end_epoch(epoch)

    def step(self, indices: list[int]) -> float:
        """One optimizer step over this process's examples ``indices``; returns their mean loss."""
        micro = micro_batches(indices, self.config.grad_accum)
        total, value = len(indices), 0.0
        self.model.train()
        for j, mb in enumerate(micro):
            sync = j == len(micro) - 1 or not self.ctx.active or self.config.fsdp  # FSDP2: reduce each one
            with contextlib.nullcontext() if sync else self.ddp.no_sync():
                with self.plan.forward_context():
                    loss = self.loss_fn(self.ddp, [self.data.train[i] for i in mb])
                scaled = loss * (len(mb) / total)
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            value += loss.item() * len(mb) / total
        if math.isfinite(value):
            factor = lr_factor(self.state.global_step, self.steps_per_epoch * self.config.epochs,
                               self.config.warmup_steps, self.config.schedule)
            set_lr(self.optimizer, factor)
            if self._optimizer_step():
                self.prepared.after_step(self.state.global_step)  # AdaLoRA: update_and_allocate
        self.optimizer.zero_grad(set_to_none=True)
        return value

    def _optimizer_step(self) -> bool:
        """optimizer.step(), through the loss scaler under 16-mixed; False when the scaler skipped it."""
        if self.scaler is None:
            self._clip()
            self.optimizer.step()
            return True
        self.scaler.unscale_(self.optimizer)  # true gradients for the step hook (AdaLoRA scores them) and clipping
        self._clip()
        before = self.scaler.get_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        check_scale(self.scaler)
        return self.scaler.get_scale() >= before  # the scale drops only when the step was skipped

    def _clip(self) -> None:
        """--max-grad-norm: scale the gradients so that their global L2 norm (over every trained tensor; DDP's are
        already averaged, FSDP2's DTensor shards are reduced by torch) is at most the limit."""
        if self.config.max_grad_norm is not None:
            params = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)

    def _after_step(self, epoch: int, b: int, n_batches: int, loss: float) -> None:
        if self.lease is not None and self.lease.lost:  # before writing: the new owner now writes this run's files
            raise LeaseLost(f"the lease on {self.run_id} expired and another worker took the run over")
        state = self.state
        state.global_step += 1
        state.step_in_epoch = b + 1
        state.loss_sum += loss
        state.loss_count += 1
        self.log.write(state.global_step, epoch + 1, loss, self.optimizer.param_groups[0]["lr"],
                       state.train_seconds + time.time() - self.started)
        every = self.config.checkpoint_every
        if every > 0 and state.global_step % every == 0 and b + 1 < n_batches:
            self.checkpoint()
        self.steps_here += 1
        if self.stop_after is not None and self.steps_here >= self.stop_after:
            raise RunInterrupted(f"stopped after {self.steps_here} steps (stop_after)")

    def _end_epoch(self, epoch: int) -> bool:
        state, config = self.state, self.config
        val_loss, val_metric = self.evaluate(self.data.val, self.val_metric)
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
            self.best = trainable_copy(self.model)  # --fsdp: this rank's shards, never a whole copy
        state.epoch, state.step_in_epoch, state.loss_sum, state.loss_count = epoch + 1, 0, 0.0, 0
        self.checkpoint()
        return True

    @property
    def val_metric(self) -> bool:
        """Whether validation computes the metric too (generation tasks decode only with --val-generate)."""
        return self.data.spec.kind != "generation" or self.config.val_generate

    def checkpoint(self) -> None:
        """Save a checkpoint (rank 0 writes; every rank of a sharded run writes its own parts), unless checkpoints
        are off."""
        if self.config.checkpoint_every < 0:
            return
        if self.ctx.is_main or self.config.fsdp:
            seconds, cpu = self.state.train_seconds, self.state.cpu_seconds
            self.state.train_seconds = seconds + time.time() - self.started
            self.state.cpu_seconds = cpu + time.process_time() - self.cpu_started
            save_checkpoint(self.ckpt, self.state, self.prepared, self.optimizer, self.best, self.run_id,
                            self.scaler, write=self.ctx.is_main)
            self.state.train_seconds, self.state.cpu_seconds = seconds, cpu
        barrier(self.ctx)

    def load_best(self) -> None:
        """Put the best epoch's trainable tensors into the model (under --fsdp, this rank's shards of them)."""
        if self.best is not None:
            best = as_dtensors(self.best, dict(self.model.named_parameters())) if is_sharded(self.model) else self.best
            load_trainable(self.model, best, source="the best epoch's tensors")

    def evaluate(self, items: list[Any], with_metric: bool) -> tuple[float, float | None]:
        """(mean loss, metric or None) over ``items``, split across ranks; under --fsdp every rank runs every item
        (each forward is a collective: the ranks must run the same number)."""
        ctx = DistContext(0, 1, self.ctx.device) if self.config.fsdp else self.ctx
        return evaluate(self.model, self.objective, self.plan, ctx, items, with_metric)


def predict(model: torch.nn.Module, objective: Any, plan: PrecisionPlan, ctx: DistContext, items: list[Any],
            with_metric: bool) -> tuple[list[float], list[Any] | None]:
    """Per-item losses and predictions (None unless ``with_metric``) of ``model`` over ``items`` with the run's
    objective, split across ranks and gathered back in item order."""
    model.eval()
    mine = shard(len(items), ctx)
    with plan.forward_context():
        losses, preds = objective.evaluate(model, [items[i] for i in mine], with_metric)
    losses = gather_shards(losses, len(items), ctx)
    return losses, None if preds is None else gather_shards(preds, len(items), ctx)


def evaluate(model: torch.nn.Module, objective: Any, plan: PrecisionPlan, ctx: DistContext, items: list[Any],
             with_metric: bool) -> tuple[float, float | None]:
    """(mean loss, metric or None) of ``model`` over ``items`` with the run's objective, split across ranks."""
    losses, preds = predict(model, objective, plan, ctx, items, with_metric)
    loss = sum(losses) / len(losses) if losses else float("nan")
    return loss, None if preds is None else objective.metric(preds, items)
