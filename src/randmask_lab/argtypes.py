"""argparse value types shared by the lab's verbs: a bad value is argparse's one-line usage error."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """``--option N`` with N ≥ 1 (a count of batches, samples, features to list)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """``--option N`` with N ≥ 0 (a feature index, a count where 0 means off)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer ≥ 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer ≥ 0, got {text}")
    return value


__all__ = ["non_negative_int", "positive_int"]
