"""benchmarks/checkpoint_shards.py: both formats save on two ranks, and rank 0 hands the writer half the bytes with
per-rank parts (every dim 0 divides by 2 at hidden 64), with a lower peak."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import checkpoint_shards  # noqa: E402


def test_a_quick_run_measures_both_formats_on_rank_0():
    report = checkpoint_shards.run(rounds=1, hidden=64)
    ratio = report["ratio_whole_over_parts"]
    assert ratio["tensor_mb"]["median"] == 2.0 and ratio["peak_mb"]["median"] > 1.0
    assert len(report["raw"]["parts"]) == len(report["raw"]["whole"]) == 1
