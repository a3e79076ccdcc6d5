"""argparse value types shared by the lab's verbs: a bad value is argparse's one-line usage error."""

from __future__ import annotations

import argparse


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


__all__ = ["non_negative_int", "positive_int"]
