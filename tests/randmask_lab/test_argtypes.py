from __future__ import annotations

import argparse

import pytest

from randmask_lab.argtypes import non_negative_int, positive_int


def test_positive_int() -> None:
    assert positive_int("3") == 3
    for bad in ("0", "-1", "1.5", "x", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="positive integer"):
            positive_int(bad)


def test_non_negative_int() -> None:
    assert non_negative_int("0") == 0 and non_negative_int("7") == 7
    for bad in ("-1", "2.0", "abc"):
        with pytest.raises(argparse.ArgumentTypeError, match="integer ≥ 0"):
            non_negative_int(bad)
