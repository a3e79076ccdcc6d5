"""The options that only shape training, which a run that trains nothing (``zeroshot``) cannot honour.

A zero-shot run evaluates the pretrained model as it is. Its learning rate, optimizer, schedule, mask or order
seed, targets and method options change nothing it computes, yet each is part of the run id: accepted, they made
a new run id for the same result and were silently ignored. So ``RunConfig.validate`` refuses them at anything
but their default, and a sweep or study, whose common options are meant for the methods that train, sets them
back to their defaults for its zero-shot cells (``without_training_options``). Every committed zero-shot record
holds these defaults, so its run id is unchanged.

Kept: the protocol's fields (sample sizes, epochs, batch size, grouping, clipping, mode), which place a zero-shot
row under the heading of the runs it is compared with, and the evaluation's own options.
"""

from __future__ import annotations

import dataclasses
from typing import Any

# RunConfig fields that only the training loop reads (optimizer, schedule, step limit, best-epoch choice) or that
# only a method which trains something reads (mask and order seeds, targets, head modules, method options).
TRAINING_ONLY: tuple[str, ...] = ("lr", "head_lr", "grad_accum", "weight_decay", "adam_betas", "adam_eps",
                                  "schedule", "warmup_steps", "max_steps", "select_by", "eval_initial", "mask_seed",
                                  "order_seed", "targets", "head_modules", "method_options")
UNTRAINED_METHODS = ("zeroshot",)


def _default(config: Any, name: str) -> Any:
    """A RunConfig field's default (its factory's value for a mutable one)."""
    f = next(f for f in dataclasses.fields(config) if f.name == name)
    value = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
    return tuple(value) if name == "adam_betas" else value  # stored as a tuple (RunConfig.__post_init__)


def training_options_given(config: Any) -> list[str]:
    """The training-only fields of ``config`` away from their defaults (empty for a method that trains)."""
    if config.method not in UNTRAINED_METHODS:
        return []
    return [name for name in TRAINING_ONLY if getattr(config, name) != _default(config, name)]


def without_training_options(config: Any) -> Any:
    """``config`` with its training-only fields at their defaults when its method trains nothing, else as it is:
    how a sweep or study gives its common options to the cells that train and not to a zero-shot cell."""
    given = training_options_given(config)
    return dataclasses.replace(config, **{name: _default(config, name) for name in given}) if given else config


def untrained_problem(config: Any) -> str | None:
    """One line naming the training-only options a run that trains nothing was given, and the fix; else None."""
    given = training_options_given(config)
    if not given:
        return None
    flags = ", ".join("--" + name.replace("_", "-") for name in given)
    return (f"{flags} shape{'s' * (len(given) == 1)} training, and --method {config.method} trains nothing (it "
            "evaluates the pretrained model): it would be ignored yet make another run id. Drop it")


__all__ = ["TRAINING_ONLY", "UNTRAINED_METHODS", "training_options_given", "untrained_problem",
           "without_training_options"]
