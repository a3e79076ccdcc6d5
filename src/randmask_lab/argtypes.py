"""argparse value types shared by the lab's verbs: a bad value is argparse's one-line usage error; and the
checks of option values that come from anywhere (the command line, a study spec's JSON): their types, and the
bounds of learning rates, seeds and lease lengths, so that a careless value is an error, not a diverged record,
an overflow traceback or a thread crash."""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from typing import Any, Literal, Union

MAX_LR = 10.0  # AdamW moves every trained weight by about lr per step; the paper's largest is 1e-1
MAX_SEED = 2**63 - 1  # torch.manual_seed's (and a 64-bit generator's) range
LEASE_SECONDS = (1.0, 7 * 86400.0)  # a heartbeat every quarter lease: shorter loses leases to a busy machine


def _int_at_least(text: str, minimum: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
    return value


def positive_int(text: str) -> int:
    """``--option N`` with N ≥ 1 (a count of batches, samples, features to list)."""
    return _int_at_least(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """``--option N`` with N ≥ 0 (a feature index, a count where 0 means off)."""
    return _int_at_least(text, 0, "an integer ≥ 0")


def positive_float(text: str) -> float:
    """``--option X`` with X finite and > 0 (a tolerance, a factor, minutes): NaN would never stop or compare."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _allowed(tp: Any) -> tuple[list[Any], bool]:
    """(the types or Literal choices an annotation allows, whether None is allowed)."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return [x for a in args for x in _allowed(a)[0]], len(args) < len(typing.get_args(tp))
    return [tp], False


def _fits(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin is Literal:  # the type of its choices only: which choice is right is the field's own check
        return any(type(value) is type(choice) for choice in typing.get_args(tp))
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin in (list, tuple):
        item = typing.get_args(tp)[0] if typing.get_args(tp) else Any
        return isinstance(value, (list, tuple)) and (item is Any or all(_fits(v, item) for v in value))
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    return True  # a type this check does not know: left to the field's own checks


_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def type_problem(obj: Any) -> str | None:
    """The first field of dataclass ``obj`` whose value its annotation does not allow (a JSON spec's "5" for
    an int, 1e30 for a seed, "false" for a bool), as a one-line message; None when all fit."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        allowed, optional = _allowed(hints[f.name])
        if (value is None and optional) or any(_fits(value, tp) for tp in allowed):
            continue
        want = " or ".join(_NAMES.get(a, getattr(a, "__name__", None) or str(a)) for a in allowed)
        return f"--{f.name.replace('_', '-')} must be {want}{' (or unset)' if optional else ''}, got {value!r}"
    return None


def bounds_problem(obj: Any) -> str | None:
    """Finite floats everywhere; lr and head_lr at most MAX_LR; seeds at most MAX_SEED; the lease in
    LEASE_SECONDS. The first value outside, as a one-line message; None when all are inside."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            return f"--{f.name.replace('_', '-')} must be a finite number, got {value}"
    for name in ("lr", "head_lr"):
        value = getattr(obj, name, None)
        if value is not None and value > MAX_LR:
            return (f"--{name.replace('_', '-')} must be at most {MAX_LR:g}, got {value:g} (AdamW moves every trained "
                    "weight by about lr per step; the paper's largest is 0.1)")
    for name in ("seed", "data_seed", "mask_seed", "order_seed"):
        value = getattr(obj, name, None)
        if value is not None and value > MAX_SEED:
            return f"--{name.replace('_', '-')} must be at most 2**63 - 1, got {value}"
    lease = getattr(obj, "lease_seconds", None)
    if lease is not None and not LEASE_SECONDS[0] <= lease <= LEASE_SECONDS[1]:
        return (f"--lease-seconds must be between {LEASE_SECONDS[0]:g} and {LEASE_SECONDS[1]:g} (a week), "
                f"got {lease:g}: a heartbeat renews the lease every quarter of it")
    return None


__all__ = ["LEASE_SECONDS", "MAX_LR", "MAX_SEED", "bounds_problem", "non_negative_int", "positive_float",
           "positive_int", "type_problem"]
