"""benchmarks/delta_orientation.py: one cell times both orientations of the library's own delta_matmul (not timed)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import delta_orientation  # noqa: E402
import randmask.delta as delta  # noqa: E402


def test_a_cell_reports_the_paired_ratio(monkeypatch):
    monkeypatch.setattr(delta, "DENSE_FIRST_MIN_OUTPUT", delta.DENSE_FIRST_MIN_OUTPUT)  # the cell switches it
    monkeypatch.setattr(delta, "DENSE_FIRST_MAX_PER_ROW", 1 << 62)
    row = delta_orientation.cell(16, (24, 40), 2, rounds=2)
    assert row["nnz"] == 48 and row["rounds"] == 2 and row["ci95"][0] <= row["dense_first_over_csr_first"]
