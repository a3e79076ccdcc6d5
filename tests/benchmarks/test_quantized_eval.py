"""quantized_eval's options: a count that would time nothing is argparse's one-line error, before any model loads."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import quantized_eval  # noqa: E402


@pytest.mark.parametrize("option", ["--batch", "--rounds", "--threads"])
def test_a_count_below_one_is_refused_by_name(option, capsys):
    with pytest.raises(SystemExit) as exit_:
        quantized_eval.main([option, "0"])
    assert exit_.value.code == 2
    assert f"argument {option}: must be a positive integer, got 0" in capsys.readouterr().err
