"""length_grouping's arithmetic: padded tokens of a batching, and the epoch-time ratio with its CI."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import length_grouping  # noqa: E402


def test_padded_over_real_counts_each_batch_at_its_longest():
    lengths = [2, 4, 1, 1]
    assert length_grouping.padded_over_real(lengths, [[0, 1], [2, 3]]) == (8 + 2) / 8
    assert length_grouping.padded_over_real(lengths, [[0, 2], [1, 3]]) == (4 + 8) / 8


def test_grouped_epoch_pads_less_and_keeps_every_example():
    lengths = [(i * 53) % 211 + 5 for i in range(250)]
    plain = length_grouping.epoch_batches(lengths, 0, 0, 8, grouped=False)
    grouped = length_grouping.epoch_batches(lengths, 0, 0, 8, grouped=True)
    assert sorted(i for b in plain for i in b) == sorted(i for b in grouped for i in b) == list(range(250))
    assert length_grouping.padded_over_real(lengths, grouped) < length_grouping.padded_over_real(lengths, plain)


def test_epoch_ratio_is_the_ratio_of_sums_inside_its_interval():
    out = length_grouping.epoch_ratio([3.0, 5.0, 4.0, 6.0], [2.0, 3.0, 2.5, 4.5])
    assert out["speedup"] == round(18 / 12, 3) and out["rounds"] == 4
    assert out["ci95"][0] <= out["speedup"] <= out["ci95"][1]
