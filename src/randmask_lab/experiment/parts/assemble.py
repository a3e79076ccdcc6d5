"""From a RunConfig to the pieces of a run: ``assemble(config) -> RunParts`` (data, tokenised items, the prepared
model, the objective, the precision plan), the one build path of training, the analysis commands and the benchmarks.
The steps it is made of (``sample_splits``, ``load_model``, ``prepare``...) stay public for the benchmarks that
need one piece alone."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from randmask import MaskingError
from randmask_lab.errors import RunError
from randmask_lab.experiment.compute.distributed import DistContext
from randmask_lab.experiment.compute.precision import PrecisionPlan, resolve_precision
from randmask_lab.experiment.compute.quantize import quantization_config
from randmask_lab.experiment.parts.data import bos_prefix, encode_pair, encode_prompt
from randmask_lab.experiment.parts.head import HeadObjective
from randmask_lab.experiment.parts.lm import LMObjective
from randmask_lab.experiment.run.config import RunConfig
from randmask_lab.experiment.run.sources import data_fingerprint, split_sources
from randmask_lab.methods import (
    METHOD_NAMES,
    PreparedModel,
    check_method_options,
    default_head_modules,
    prepare_method,
)
from randmask_lab.methods.common import seeded
from randmask_lab.tasks import Pools, TaskSpec, TaskSplits, get_task, protocol_split
from randmask_lab.zoo import load_causal_lm, load_sequence_classifier, model_family, prepends_bos


@dataclass
class RunData:
    """A task's protocol splits, tokenised for one model and mode."""

    spec: TaskSpec
    mode: str  # "lm" or "head"
    splits: TaskSplits
    train: list[Any]
    val: list[Any]
    test: list[Any]


def check_names(config: RunConfig) -> TaskSpec:
    """The task spec; RunError for an unknown task or method, or an impossible combination."""
    try:
        spec = get_task(config.task)
    except ValueError as e:
        raise RunError(str(e)) from None
    if config.method not in METHOD_NAMES:
        raise RunError(f"unknown method {config.method!r}; known methods: {', '.join(METHOD_NAMES)}")
    config.validate()
    try:
        check_method_options(config.method, config.method_options)
    except ValueError as e:
        raise RunError(f"--option: {e}") from None
    return spec


def resolve_mode(config: RunConfig, spec: TaskSpec) -> str:
    """"lm" or "head": the config's, or the model family's under "auto"; checks the task supports it."""
    mode = model_family(config.model) if config.mode == "auto" else config.mode
    if mode == "head" and not spec.has_head_mode:
        raise RunError(f"task {spec.name!r} has no classification-head mode (it is {spec.kind}); use a "
                       "causal LM (e.g. --model smollm2-135m) or a classification task")
    return mode


def load_model(config: RunConfig, spec: TaskSpec, mode: str, dtype: torch.dtype = torch.float32,
               device: torch.device | None = None) -> tuple[Any, Any]:
    """(base model, tokenizer) with weights in ``dtype`` (stored quantized under ``--quantize``, computing in
    ``dtype``); a fresh head is initialised from the mask seed."""
    if mode == "head":
        if config.quantize != "none":
            raise RunError(f"--quantize {config.quantize} applies to causal LMs (--mode lm), not the head mode")
        with seeded(config.seeds.mask):
            return load_sequence_classifier(config.model, spec.num_labels or 2, dtype=dtype)
    device = torch.device("cpu") if device is None else device
    return load_causal_lm(config.model, dtype=dtype, device=device,
                          quantization_config=quantization_config(config.quantize, dtype, device))


def run_head_modules(config: RunConfig, model: Any) -> list[str]:
    """The task-head modules of a run: the config's, else the model's default (classifier, pooler)."""
    return default_head_modules(model) if config.head_modules is None else list(config.head_modules)


def prepare(config: RunConfig, model: Any, total_steps: int) -> PreparedModel:
    """Apply the method; RunError naming the model and method when it cannot be applied."""
    try:
        return prepare_method(config.method, model, ratio=config.trainable_ratio, density=config.density,
                              seed=config.seeds.mask, targets=config.targets, total_steps=total_steps,
                              head_modules=config.head_modules, **config.method_options)
    except (ValueError, MaskingError) as e:
        raise RunError(f"cannot apply {config.method} to {config.model}: {e}") from None


def encode(config: RunConfig, spec: TaskSpec, mode: str, tokenizer: Any, examples: Sequence[Any]) -> list[Any]:
    """Tokenise examples for the mode: LMItem (prompt) or HeadItem (text pair)."""
    if mode == "head":
        return [encode_pair(tokenizer, spec.render_pair(ex), config.max_length) for ex in examples]
    bos = bos_prefix(tokenizer, force=prepends_bos(config.model))
    return [encode_prompt(tokenizer, spec.render(ex), config.max_length, bos) for ex in examples]


@functools.cache
def _pools(task: str, data_dir: str | None, source: str | None) -> Pools:
    # Read each original file once per process: a sweep samples SST-2's 60k rows per run otherwise.
    return get_task(task).load(data_dir, source)


def sample_splits(config: RunConfig, spec: TaskSpec) -> TaskSplits:
    """The protocol splits for the data seed (before any model is loaded: data errors come first).

    Same as ``load_task_splits``, with the original files read once per process.
    """
    pools = _pools(spec.name, config.data_dir, config.source)
    train, val, test, notes = protocol_split(pools.train, pools.test, data_seed=config.seeds.data,
                                             n_train=config.n_train, n_val=config.n_val,
                                             n_test=config.n_test, salt=spec.name)
    if not train or not val:
        raise RunError(f"task {spec.name!r} gave {len(train)} train / {len(val)} val examples; "
                       "raise --n-train / --n-val")
    return TaskSplits(spec.name, config.seeds.data, tuple(train), tuple(val), tuple(test), pools.origin,
                      tuple(notes))


def split_record(config: RunConfig, spec: TaskSpec, splits: TaskSplits) -> dict[str, Any]:
    """Where each split of a run came from (files, pool, rows) and the data fingerprint, for its record."""
    pools = _pools(spec.name, config.data_dir, config.source)
    fingerprint = data_fingerprint(spec.name, config.data_dir, config.source)
    return split_sources(splits, fingerprint, pools.train_origin or pools.origin, pools.test_origin)


def load_data(config: RunConfig, spec: TaskSpec, mode: str, tokenizer: Any,
              splits: TaskSplits | None = None) -> RunData:
    """Sample the protocol splits with the data seed (unless given) and tokenise them."""
    splits = splits or sample_splits(config, spec)
    items = [encode(config, spec, mode, tokenizer, part) for part in (splits.train, splits.val, splits.test)]
    return RunData(spec, mode, splits, *items)


@dataclass(frozen=True)
class TrainingLoss:
    """The loss a run minimises on a batch of items: the task objective plus the method's extra terms
    (AdaLoRA's orthogonality penalty). The training loop and the analysis commands call this one object."""

    objective: LMObjective | HeadObjective
    prepared: PreparedModel

    def __call__(self, model: torch.nn.Module, items: Sequence[Any]) -> torch.Tensor:
        loss = self.objective.loss(model, items)
        extra = self.prepared.loss_terms()
        return loss if extra is None else loss + extra


def make_objective(config: RunConfig, data: RunData, tokenizer: Any) -> LMObjective | HeadObjective:
    """The loss/evaluation object for the run's mode."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if data.mode == "head":
        return HeadObjective(pad_id, eval_batch_size=max(config.eval_batch_size, 8))
    return LMObjective(data.spec, tokenizer, pad_id, config.eval_batch_size, config.max_new_tokens)


@dataclass
class RunParts:
    """Everything a run's training loop needs, built from its config by ``assemble``."""

    config: RunConfig
    spec: TaskSpec
    plan: PrecisionPlan
    """The precision: weight dtype, autocast, attention kernel, loss scaler."""
    data: RunData
    tokenizer: Any
    prepared: PreparedModel
    """The base model with the method applied (``prepared.model``), on the run's device."""
    objective: LMObjective | HeadObjective
    heads: list[str]
    """The task-head modules (head mode), trained by every method."""
    attention: str
    """The attention kernel the model runs (recorded)."""
    total_steps: int
    """Optimizer steps of the whole run (the methods' schedules read it: AdaLoRA's budget)."""
    run_id: str
    """``config.run_id``, computed once (it hashes the task's data files)."""

    @property
    def run_dir(self) -> Path:
        """The run's folder: ``<out_dir>/<run id>``."""
        return Path(self.config.out_dir) / self.run_id

    @property
    def model(self) -> torch.nn.Module:
        """The prepared model."""
        return self.prepared.model

    def loss(self) -> TrainingLoss:
        """The loss the run minimises: the objective plus the method's extra terms."""
        return TrainingLoss(self.objective, self.prepared)

    def data_record(self) -> dict[str, Any]:
        """Where each split came from and the data fingerprint, for the run's record."""
        return split_record(self.config, self.spec, self.data.splits)


def steps_per_epoch(config: RunConfig, n_train: int, world: int = 1) -> int:
    """Optimizer steps in one epoch of ``n_train`` items over ``world`` processes (``--max-steps`` caps it)."""
    step = config.batch_size * world
    n = n_train // step if world > 1 else -(-n_train // step)  # several ranks: drop the ragged last batch
    return min(n, config.max_steps) if config.max_steps else n


def assemble(config: RunConfig, ctx: DistContext | None = None, *, plan: PrecisionPlan | None = None,
             total_steps: int | None = None, spec: TaskSpec | None = None, run_id: str | None = None) -> RunParts:
    """Build a run from its config: task data (sampled with the data seed, before any model is loaded, so data
    errors come first), the model in the plan's precision on ``ctx``'s device, the method applied with the mask
    seed, and the objective. RunError for anything a run cannot use.

    ``plan`` defaults to the config's precision on ``ctx.device`` (``auto`` resolved there); ``total_steps`` to
    the run's own (epochs x steps per epoch); ``spec`` to ``check_names(config)``; ``run_id`` to ``config.run_id``.
    """
    ctx = ctx or DistContext()
    spec = spec or check_names(config)
    mode = resolve_mode(config, spec)
    plan = plan or PrecisionPlan(resolve_precision(config.precision, ctx.device), ctx.device)
    splits = sample_splits(config, spec)
    model, tokenizer = load_model(config, spec, mode, dtype=plan.weight_dtype, device=ctx.device)
    attention = plan.setup_attention(model)
    data = load_data(config, spec, mode, tokenizer, splits)
    heads = run_head_modules(config, model)
    if total_steps is None:
        total_steps = steps_per_epoch(config, len(data.train), ctx.world) * config.epochs
    prepared = prepare(config, model, total_steps=total_steps)
    if prepared.needs_prompts and mode == "head":
        raise RunError(f"method {config.method!r} needs prompt scoring (--mode lm): in head mode the classifier is "
                       "untrained, so its score is chance, not the model's zero-shot ability")
    prepared.model.to(ctx.device)
    plan.cast_trainable(prepared.model, prepared.fp32_trainable)
    objective = make_objective(config, data, tokenizer)
    return RunParts(config, spec, plan, data, tokenizer, prepared, objective, heads, attention, total_steps,
                    run_id or config.run_id)
