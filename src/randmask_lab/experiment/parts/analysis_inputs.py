"""Model + training batches for the analysis commands (Hessian, distances), built like a run's."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from randmask import loads_strict, read_limited
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


# The options that say what is measured, by RunConfig field: a run folder or an adapter records them itself.
_FLAGS = {"model": "--model", "task": "--task", "method": "--method", "trainable_ratio": "--trainable-ratio",
          "seed": "--seed"}
# randmask's mask kinds and the `randmask train` method that draws each.
_KIND_METHOD = {"random": "randmask", "structured": "structured"}


def _given(args: argparse.Namespace) -> dict[str, Any]:
    """The describing options given on the command line (None: not given)."""
    return {"model": _arg(args, "model"), "task": _arg(args, "task"), "method": _arg(args, "method"),
            "trainable_ratio": _arg(args, "trainable_ratio", "ratio"), "seed": _arg(args, "seed")}


def _same(key: str, given: Any, recorded: Any) -> bool:
    if key == "trainable_ratio" and isinstance(recorded, float):
        return math.isclose(float(given), recorded, rel_tol=1e-9)
    if key == "model" and given != recorded:  # the same local folder written two ways
        return Path(str(given)).exists() and Path(str(given)).resolve() == Path(str(recorded)).resolve()
    return given == recorded


def _refuse_contradictions(given: dict[str, Any], recorded: dict[str, Any], source: str) -> None:
    """A RunError for the first option given that contradicts what ``source`` records: the analysis measures
    the saved weights, so a contradicting option would be silently ignored and the record mislabelled."""
    for key, value in given.items():
        if value is not None and key in recorded and not _same(key, value, recorded[key]):
            raise RunError(f"{_FLAGS[key]} {value} contradicts --adapter {source}, which has {key} "
                           f"{recorded[key]!r}; drop {_FLAGS[key]} (or pass {recorded[key]!r}) to measure it, "
                           "or pass the run or adapter that was trained with that option")


def _run_config(run: Path) -> RunConfig:
    try:
        text = read_limited(run / "config.json", 1 << 20, "run config", error=RunError,
                            fix="pass another --adapter")
        return RunConfig.from_dict(loads_strict(text.decode("utf-8")))
    except (ValueError, UnicodeDecodeError, TypeError, RecursionError) as e:
        raise RunError(f"{run / 'config.json'} is not a run config ({e}); pass another --adapter") from None


def _adapter_budget(adapter: Path) -> dict[str, Any]:
    """method, trainable_ratio, density and (mask) seed a bare randmask adapter folder was saved with."""
    from randmask import MaskingError, read_adapter_files

    try:  # the library's own verified reader: bounded, checksummed, its schema checked
        header, _ = read_adapter_files(adapter)
        masking = header["masking_config"]
        kind, recorded = masking["mask_kind"], {k: masking[k] for k in ("trainable_ratio", "density", "seed")}
    except (MaskingError, KeyError, TypeError) as e:
        raise RunError(f"--adapter {adapter}: its adapter config has no readable masking_config ({e}); "
                       "re-save the adapter with randmask.save_adapter") from None
    if kind not in _KIND_METHOD:
        raise RunError(f"--adapter {adapter}: mask_kind {kind!r} is not one `randmask train` draws "
                       f"({', '.join(_KIND_METHOD)}); pass a run folder instead")
    return {"method": _KIND_METHOD[kind], **recorded}


def _config(args: argparse.Namespace) -> RunConfig:
    """The measured run's config: from a run folder or a bare adapter folder given as --adapter (options that
    contradict it are refused), else from the options."""
    adapter, given = getattr(args, "adapter", None), _given(args)
    run = _run_folder(adapter)
    if run is not None:
        config = _run_config(run)
        _refuse_contradictions(given, {k: getattr(config, k) for k in _FLAGS}, str(adapter))
        return config  # its own n_train/n_val/n_test: the same training examples, never its validation ones
    if not given["model"] or not given["task"]:
        raise RunError("give --model and --task (or --adapter with a run folder written by `randmask train`)")
    if adapter and not (Path(adapter) / "adapter_config.json").is_file():
        raise RunError(f"--adapter {adapter}: neither a run folder (config.json + trainable/) nor a randmask "
                       "adapter folder (adapter_config.json)")
    if adapter:  # the mask and budget come from the adapter's own file, so the record must too
        recorded = _adapter_budget(Path(adapter))
        _refuse_contradictions(given, recorded, str(adapter))
        config = RunConfig(model=given["model"], task=given["task"], **recorded)
    else:
        config = RunConfig(model=given["model"], task=given["task"], method=given["method"] or "randmask",
                           trainable_ratio=given["trainable_ratio"],
                           seed=0 if given["seed"] is None else given["seed"])
    need = _arg(args, "num_batches", "n_batches", default=1) * _arg(args, "batch_size", default=8)
    # No run to follow: a would-be run that trains on exactly the examples measured.
    config.n_train, config.n_val, config.n_test = max(need, 1), 1, 0
    return config


def describe_analysis_run(args: argparse.Namespace) -> dict[str, Any]:
    """What an analysis command measured: model, task, method (with its options: LoRA r=1 and r=16 are other
    cells), budget, and whether trained weights were loaded."""
    config = _config(args)
    return {"model": config.model, "task": config.task, "method": config.method, "ratio": config.trainable_ratio,
            "density": config.density, "method_options": dict(config.method_options), "seed": config.seed,
            "trained": bool(getattr(args, "adapter", None)),
            "adapter": str(args.adapter) if getattr(args, "adapter", None) else None}


def _refuse_non_finite(tensors: dict[str, torch.Tensor], file: Path) -> None:
    """A RunError when a saved tensor holds inf/nan: every measurement at such weights is inf/nan (a traceback
    in the Hessian, ``Infinity`` in distance.json, nan tables), so the run is damaged, not measurable."""
    bad = next((name for name, t in tensors.items() if t.is_floating_point() and not bool(t.isfinite().all())), None)
    if bad is not None:
        raise RunError(f"{file} holds non-finite values (inf/nan) in {bad}: the run diverged or the file is "
                       "damaged; retrain it (randmask train with --restart, a lower --lr if it diverged) or pass "
                       "another --adapter")


def _load_weights(model: nn.Module, adapter: str | Path, run: Path | None) -> None:
    """Trained weights from a run folder, or a randmask adapter folder (save_adapter) onto ``model``."""
    if run is not None:
        file = run / "trainable" / TRAINABLE_FILE
        try:
            tensors = read_tensors(file, tensor_file_limit(model))
            _refuse_non_finite(tensors, file)
            load_trainable(model, tensors, source=str(file))
        except (ValueError, OSError) as e:
            raise RunError(f"--adapter {adapter}: {e}") from None
        return
    from randmask import load_adapter, masked_layers, unload

    unload(model)  # the adapter file brings its own mask
    load_adapter(model, adapter, is_trainable=True)
    values = {f"{name}.values": layer.adapters[layer.active_adapter].values
              for name, layer in masked_layers(model).items() if layer.active_adapter in layer.adapters}
    _refuse_non_finite(values, Path(adapter))  # the adapter folder's weights file


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
    used, or a randmask adapter folder loaded onto --model, whose own config gives the method and budget).

    Each batch is a list of the run's tokenised training items; ``loss_fn(model, batch)`` is the
    training objective on it. For a run folder the batches are drawn from the run's own training examples
    (never its validation ones), in the run's first-epoch order cut into --batch-size batches (the run's
    own first steps when --batch-size is the run's); asking for more examples than it trained on is refused.
    """
    config = _config(args)
    n_batches = _arg(args, "num_batches", "n_batches", default=1)
    size = _arg(args, "batch_size", default=8)
    # fp32 on the CPU whatever the run used: curvature and distances are measured at full precision.
    parts = assemble(config, plan=PrecisionPlan("32", torch.device("cpu")), total_steps=max(1, n_batches))
    data = parts.data
    if n_batches * size > len(data.train):
        raise RunError(f"--num-batches {n_batches} x --batch-size {size} = {n_batches * size} examples, but the "
                       f"run has {len(data.train)} training examples; ask for at most {len(data.train)} (the "
                       "analysis draws only the run's training examples, never its validation ones)")
    adapter = getattr(args, "adapter", None)
    if adapter:
        _load_weights(parts.model, adapter, _run_folder(adapter))
    if _arg(args, "freeze_head", default=False):
        _freeze_head(parts.model, config)
    lengths = grouping_lengths(data.train, config.group_by_length)
    steps = epoch_batches(len(data.train), config.seeds.order, 0, size, lengths=lengths)  # the loop's own batching
    batches = [[data.train[i] for i in step] for step in steps[:n_batches]]
    return AnalysisInputs(parts.model.eval(), batches, parts.loss())
