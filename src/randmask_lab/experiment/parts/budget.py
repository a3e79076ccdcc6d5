"""Before a sweep or a study runs: every masking cell's budget fits its model.

The paper spreads a ratio evenly, the same count in every targeted matrix (``randmask.masks.per_matrix_density``),
so the smallest target caps the ratio and one entry per matrix floors it: SmolLM2's 576x192 v projections cap it at
4.93%. A run refuses such a budget in its first seconds, but in a sweep or a study that is a failed record per
attempt, found hours in. Here the check runs on a weightless copy of the model (meta device: shapes only, nothing
loaded), once per model, mode, target set and budget, before anything runs.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from randmask import MaskingError, count_base_parameters, resolve_targets
from randmask.masks import per_matrix_density
from randmask_lab.errors import ModelError, RunError
from randmask_lab.experiment.parts.assemble import check_names, resolve_mode
from randmask_lab.experiment.run.config import MASKING_METHODS, RunConfig
from randmask_lab.zoo import load_config


def weightless_model(config: RunConfig, mode: str, num_labels: int) -> torch.nn.Module:
    """The run's model class built from its config on the meta device: every parameter's shape, no values."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    model_config = load_config(config.model)
    with torch.device("meta"):
        if mode == "head":
            return AutoModelForSequenceClassification.from_config(model_config, num_labels=num_labels)
        return AutoModelForCausalLM.from_config(model_config)


def budget_problem(config: RunConfig, models: dict | None = None) -> str | None:
    """Why no run of ``config`` can draw its mask (a ratio its model cannot spread evenly), or None. None too when
    there is nothing to check (not a masking method, a per-matrix density, a quantized base) or the model cannot be
    found (the run says why, in its own words). ``models`` caches the weightless models between calls."""
    if config.method not in MASKING_METHODS or config.trainable_ratio is None or config.quantize != "none":
        return None
    spec = check_names(config)
    try:
        mode = resolve_mode(config, spec)
        key = (config.model, mode, spec.num_labels or 2)
        models = {} if models is None else models
        if key not in models:
            models[key] = weightless_model(config, mode, spec.num_labels or 2)
    except ModelError:
        return None
    model = models[key]
    try:
        sizes = [size for target in resolve_targets(model, config.targets) for size in target.block_sizes()]
        per_matrix_density(config.trainable_ratio, count_base_parameters(model), sizes)
    except MaskingError as e:
        why = " ".join(str(e).split()).rstrip(".")
        return f"{config.task} {config.method} ratio {config.trainable_ratio:g}: {why}"
    return None


def check_models_found(configs: Iterable[RunConfig]) -> None:
    """ModelError, once, when a model the configs name cannot be found (its config read: a typo in a study spec's
    model would otherwise be a failed record for every run of the study)."""
    for name in sorted({config.model for config in configs}):
        load_config(name)


def check_budgets(configs: Iterable[RunConfig]) -> None:
    """ModelError when a model cannot be found (:func:`check_models_found`); RunError naming every cell whose
    budget its model cannot take (each distinct budget checked once)."""
    configs = list(configs)
    check_models_found(configs)
    problems, seen, models = [], set(), {}
    for config in configs:
        key = (config.model, config.mode, config.task, config.method, config.trainable_ratio,
               tuple(config.targets or ()))
        if key in seen:
            continue
        seen.add(key)
        if problem := budget_problem(config, models):
            problems.append(problem)
    if problems:
        raise RunError(f"{len(problems)} cell{'s' * (len(problems) > 1)} cannot run: " + "; ".join(problems)
                       + ". Change those ratios")
