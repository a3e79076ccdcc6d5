"""Fine-tuning methods behind one interface: model + options -> trainable model + report.

>>> prepared = prepare_method("lora", model)          # doctest: +SKIP
>>> print(prepared.report)                            # lora: 294,912 / 125,239,296 trainable ...
>>> optimizer = AdamW(prepared.trainable_parameters())
>>> # in the loop: loss.backward(); optimizer.step()
>>> # if prepared.on_step: prepared.on_step(step); then optimizer.zero_grad()
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable
from functools import partial

from torch import nn

from randmask_lab.methods.adalora import current_ranks, prepare_adalora
from randmask_lab.methods.adapter import prepare_adapter
from randmask_lab.methods.bitfit import prepare_bitfit
from randmask_lab.methods.common import check_heads
from randmask_lab.methods.full import prepare_full
from randmask_lab.methods.lora import prepare_lora
from randmask_lab.methods.masking import prepare_masking
from randmask_lab.methods.prefix import prepare_prefix
from randmask_lab.methods.prepared import PreparedModel, TrainableReport, count_parameters
from randmask_lab.methods.targets import default_head_modules
from randmask_lab.methods.zeroshot import prepare_zeroshot

MASK_KIND_OF: dict[str, str] = {"randmask": "random", "structured": "structured"}
"""The randmask mask kind each masking method draws."""

_METHODS: dict[str, Callable[..., PreparedModel]] = {
    **{method: partial(prepare_masking, kind=kind) for method, kind in MASK_KIND_OF.items()},
    "full": prepare_full,
    "lora": prepare_lora,
    "adalora": prepare_adalora,
    "prefix": prepare_prefix,
    "bitfit": prepare_bitfit,
    "adapter": prepare_adapter,
    "zeroshot": prepare_zeroshot,
}
METHOD_NAMES: tuple[str, ...] = tuple(_METHODS)
_COMMON = {"model", "kind", "total", "heads", "targets", "ratio", "density", "seed", "total_steps"}

__all__ = [
    "MASK_KIND_OF",
    "METHOD_NAMES",
    "PreparedModel",
    "check_method_options",
    "TrainableReport",
    "count_parameters",
    "current_ranks",
    "default_head_modules",
    "method_options",
    "prepare_method",
]


def _params(name: str) -> set[str]:
    return set(inspect.signature(_METHODS[name]).parameters)


def method_options(name: str) -> list[str]:
    """The method-specific keyword options `prepare_method(name, ...)` accepts (e.g. lora: r)."""
    _check_name(name)
    return sorted(_params(name) - _COMMON)


def prepare_method(
    name: str,
    model: nn.Module,
    *,
    ratio: float | None = None,
    density: float | None = None,
    seed: int = 0,
    targets: list[str] | None = None,
    total_steps: int | None = None,
    head_modules: list[str] | None = None,
    **options: object,
) -> PreparedModel:
    """Prepare `model` for fine-tuning with method `name` (one of `METHOD_NAMES`), in place.

    ratio / density: masking budget (randmask, structured only): fraction of all parameters,
        or of each targeted matrix.
    seed: mask seed, and the seed of every random initialisation a method makes.
    targets: module-name suffixes to adapt (lora, adalora, randmask, structured); default: the
        query and value projections of the architecture (`randmask.default_targets`; on GPT-2 the
        q and v blocks of the fused c_attn, for every method).
    total_steps: optimizer steps of the run; required by adalora (rank schedule), ignored by
        the others.
    head_modules: task-head modules trained by every method (name suffixes); default
        `default_head_modules(model)` (classifier/score, and BERT's pooler); [] for none.
    options: method-specific settings, listed by `method_options(name)`.
    """
    _check_name(name)
    for arg, value in (("targets", targets), ("head_modules", head_modules)):
        if isinstance(value, str):
            raise ValueError(f"{arg} must be a list of module-name suffixes, e.g. [{value!r}], not a str")
    accepted = _params(name)
    if (ratio is not None or density is not None) and "ratio" not in accepted:
        raise ValueError(f"ratio/density apply to randmask and structured only, not {name!r}")
    if targets is not None and "targets" not in accepted:
        raise ValueError(f"{name!r} does not take targets (its modules are fixed by the method)")
    check_method_options(name, options)
    heads = default_head_modules(model) if head_modules is None else list(head_modules)
    check_heads(model, heads)
    given = {"ratio": ratio, "density": density, "seed": seed, "total_steps": total_steps}
    kwargs = {k: v for k, v in given.items() if k in accepted}
    if "targets" in accepted:
        kwargs["targets"] = list(targets) if targets is not None else None
    total = count_parameters(model)
    return _METHODS[name](model, total=total, heads=heads, **kwargs, **options)


def _option_types(name: str) -> dict[str, tuple[type, ...]]:
    """{option: the types its annotation allows (None dropped)} of method ``name``'s options."""
    fn = _METHODS[name]
    hints = typing.get_type_hints(getattr(fn, "func", fn))
    out = {}
    for key in method_options(name):
        tp = hints.get(key)
        args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
        out[key] = tuple(a for a in args if isinstance(a, type) and a is not type(None))
    return out


# Options whose useful range is narrower than ">= 0": (lowest, highest, why), each bound exclusive (None: open).
# alpha 0 scales the adapter's output to 0 (a run that trains nothing, recorded as trained); peft itself fails
# (a traceback) on deltaT 0 (a modulo by zero) and on betas outside (0, 1) (an assert).
_OPEN_RANGES: dict[tuple[str, str], tuple[float | None, float | None, str]] = {
    ("lora", "alpha"): (0, None, "alpha/r scales the update: 0 trains nothing"),
    ("adalora", "alpha"): (0, None, "alpha/r scales the update: 0 trains nothing"),
    ("adalora", "delta_t"): (0, None, "the steps between rank reallocations"),
    ("adalora", "beta1"): (0, 1, "the importance scores' moving-average factor"),
    ("adalora", "beta2"): (0, 1, "the uncertainty's moving-average factor"),
    ("lora", "dropout"): (None, 1, "a dropout of 1 drops every input"),
    ("adalora", "dropout"): (None, 1, "a dropout of 1 drops every input"),
}


def check_method_options(name: str, options: dict[str, object]) -> None:
    """ValueError for an unknown option, an option of the wrong type (r='abc'), a negative number, or a value
    outside an option's useful range (LoRA's alpha 0, AdaLoRA's betas outside (0, 1))."""
    _check_name(name)
    unknown = sorted(set(options) - set(method_options(name)))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for {name!r}; it accepts {method_options(name)}")
    allowed = _option_types(name)
    for key, value in options.items():
        kinds = allowed.get(key, ())
        if not kinds or value is None:
            continue
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)  # an int is fine where a float is expected
        ok = any(isinstance(value, k) and not (k is int and isinstance(value, bool)) for k in kinds)
        if not ok:
            want = " or ".join(k.__name__ for k in kinds)
            raise ValueError(f"option {key}={value!r} of {name!r} must be a {want}")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not value >= 0:
            raise ValueError(f"option {key}={value!r} of {name!r} must be >= 0")
        low, high, why = _OPEN_RANGES.get((name, key), (None, None, ""))
        if (low is not None and not value > low) or (high is not None and not value < high):
            bounds = f"> {low:g}" if high is None else (f"< {high:g}" if low is None else f"in ({low:g}, {high:g})")
            raise ValueError(f"option {key}={value!r} of {name!r} must be {bounds} ({why})")


def _check_name(name: str) -> None:
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(METHOD_NAMES)}")
