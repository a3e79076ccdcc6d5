"""Model + training batches for the analysis commands (Hessian, distances), built like a run's."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from randmask import read_limited
from randmask_lab.errors import RunError
from randmask_lab.experiment.compute.precision import PrecisionPlan
from randmask_lab.experiment.parts.assemble import assemble, run_head_modules
from randmask_lab.experiment.parts.data import epoch_batches, grouping_lengths
from randmask_lab.experiment.run.config import RunConfig
from randmask_lab.methods.prepared import TRAINABLE_FILE, is_head_param
from randmask_lab.methods.trainable import load_trainable, read_tensors, tensor_file_limit


def _arg(args: argparse.Namespace, *names: str, default: Any = None) -> Any:
    """The first of ``names`` that ``args`` sets (the analysis CLI and older callers differ)."""
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            return value
    return default


def _run_folder(adapter: str | Path | None) -> Path | None:
    """The run folder (with config.json) an --adapter path points into: the folder or its parent."""
    if not adapter:
        return None
    for folder in (Path(adapter), Path(adapter).parent):
        if (folder / "config.json").is_file() and (folder / "trainable").is_dir():
            return folder
    return None


def _config(args: argparse.Namespace) -> RunConfig:
    """The run's config from a run folder given as --adapter, else from the options."""
    run = _run_folder(getattr(args, "adapter", None))
    if run is not None:
        try:
            text = read_limited(run / "config.json", 1 << 20, "run config", error=RunError,
                                fix="pass another --adapter")
            config = RunConfig.from_dict(json.loads(text.decode("utf-8")))
        except (ValueError, UnicodeDecodeError, TypeError, RecursionError) as e:
            raise RunError(f"{run / 'config.json'} is not a run config ({e}); pass another --adapter") from None
    else:
        model, task = _arg(args, "model"), _arg(args, "task")
        if not model or not task:
            raise RunError("give --model and --task (or --adapter with a run folder written by `randmask train`)")
        config = RunConfig(model=model, task=task, method=_arg(args, "method", default="randmask"),
                           trainable_ratio=_arg(args, "trainable_ratio", "ratio"), seed=_arg(args, "seed", default=0))
    need = _arg(args, "num_batches", "n_batches", default=1) * _arg(args, "batch_size", default=8)
    config.n_train, config.n_val, config.n_test = max(need, 1), 1, 0
    return config


def describe_analysis_run(args: argparse.Namespace) -> dict[str, Any]:
    """What an analysis command measured: model, task, method, budget, and whether trained weights were loaded."""
    config = _config(args)
    return {"model": config.model, "task": config.task, "method": config.method, "ratio": config.trainable_ratio,
            "density": config.density, "seed": config.seed, "trained": bool(getattr(args, "adapter", None)),
            "adapter": str(args.adapter) if getattr(args, "adapter", None) else None}


def _load_weights(model: nn.Module, adapter: str | Path, run: Path | None) -> None:
    """Trained weights from a run folder, or a randmask adapter folder (save_adapter) onto ``model``."""
    if run is not None:
        file = run / "trainable" / TRAINABLE_FILE
        try:
            load_trainable(model, read_tensors(file, tensor_file_limit(model)), source=str(file))
        except (ValueError, OSError) as e:
            raise RunError(f"--adapter {adapter}: {e}") from None
        return
    if (Path(adapter) / "adapter_config.json").is_file():
        from randmask import load_adapter, unload

        unload(model)  # the adapter file brings its own mask
        load_adapter(model, adapter, is_trainable=True)
        return
    raise RunError(f"--adapter {adapter}: neither a run folder (config.json + trainable/) nor a randmask "
                   "adapter folder (adapter_config.json)")


def _freeze_head(model: nn.Module, config: RunConfig) -> None:
    """Stop the task head's parameters from counting as trainable (they keep their current values)."""
    heads = run_head_modules(config, model)
    frozen = [p for name, p in model.named_parameters() if p.requires_grad and is_head_param(name, heads)]
    if not frozen:
        raise RunError("--freeze-head: this model has no trainable task head (prompt-scoring models have none)")
    for p in frozen:
        p.requires_grad_(False)
    if not any(p.requires_grad for p in model.parameters()):
        raise RunError("--freeze-head left nothing trainable: the method trains only the head")


@dataclass(frozen=True)
class AnalysisInputs:
    """What an analysis measures: the prepared model, fixed training batches, and the run's loss.

    ``loss_fn(model, batch)`` is the run's own loss (``build.TrainingLoss``: the objective plus the
    method's extra terms, the object the training loop calls), so λ_max, distances and LR suggestions
    are about the loss the run optimises:
    cross-entropy over the candidates for classification prompts, the gold continuation's NLL for
    generation, the head's cross-entropy in head mode.
    """

    model: nn.Module
    batches: list[list[Any]]
    loss_fn: Callable[[nn.Module, Any], torch.Tensor]

    def __iter__(self) -> Iterator[Any]:  # model, batches, loss_fn = build_model_and_batches(args)
        return iter((self.model, self.batches, self.loss_fn))


def build_model_and_batches(args: argparse.Namespace) -> AnalysisInputs:
    """(prepared model in eval mode, batches, loss_fn) for ``args`` (--model --task --method --trainable-ratio
    --seed --num-batches --batch-size --freeze-head; --adapter: a run folder, whose config and trained weights are
    used, or a randmask adapter folder loaded onto --model).

    Each batch is a list of the run's tokenised training items; ``loss_fn(model, batch)`` is the
    training objective on it. Batches follow the run's first-epoch training order.
    """
    config = _config(args)
    n_batches = _arg(args, "num_batches", "n_batches", default=1)
    size = _arg(args, "batch_size", default=8)
    # fp32 on the CPU whatever the run used: curvature and distances are measured at full precision.
    parts = assemble(config, plan=PrecisionPlan("32", torch.device("cpu")), total_steps=max(1, n_batches))
    adapter = getattr(args, "adapter", None)
    if adapter:
        _load_weights(parts.model, adapter, _run_folder(adapter))
    if _arg(args, "freeze_head", default=False):
        _freeze_head(parts.model, config)
    data = parts.data
    lengths = grouping_lengths(data.train, config.group_by_length)
    steps = epoch_batches(len(data.train), config.seeds.order, 0, size, lengths=lengths)  # the loop's own batching
    batches = [[data.train[i] for i in step] for step in steps[:n_batches]]
    return AnalysisInputs(parts.model.eval(), batches, parts.loss())
