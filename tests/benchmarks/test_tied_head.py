"""benchmarks/tied_head.py: its three variants take the paths they name, and a run reports every ratio (not timed)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import tied_head  # noqa: E402
from bench_models import build_base  # noqa: E402


def test_a_quick_run_reports_each_variant_against_qv():
    rows = tied_head.run(quick=True, rounds=1, warmup=0, density=1e-2)
    assert list(rows) == ["q/v", "q/v + tied lm_head", "q/v + untied lm_head"]
    assert rows["q/v"]["ratio_to_qv"] == 1.0 and all(row["rounds"] == 1 for row in rows.values())


def test_an_untied_base_is_refused():
    base = build_base(True, "fp32")
    base.lm_head.weight = type(base.lm_head.weight)(base.lm_head.weight.detach().clone())
    with pytest.raises(ValueError, match="tied lm_head"):
        tied_head.variants(base, 1e-2)
