"""The benchmark's statistics: paired per-round ratios and the bootstrap CI of their median."""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from bench_stats import interleaved, paired_ratios, summarize, timed  # noqa: E402


def test_paired_ratios_are_per_round():
    # A slow phase of the machine (round 2) doubles both times: the paired ratio does not move.
    assert paired_ratios([1.1, 2.2, 1.1], [1.0, 2.0, 1.0]) == pytest.approx([1.1, 1.1, 1.1])


def test_paired_ratios_reject_mismatched_rounds():
    with pytest.raises(ValueError, match="same non-zero number of rounds"):
        paired_ratios([1.0, 2.0], [1.0])
    with pytest.raises(ValueError):
        paired_ratios([], [])


def test_constant_ratios_give_a_zero_width_ci():
    s = summarize([1.03] * 20)
    assert (s.median, s.ci_low, s.ci_high, s.rounds) == pytest.approx((1.03, 1.03, 1.03, 20))
    assert s.half_width == pytest.approx(0.0)


def test_ci_brackets_the_median_and_narrows_with_more_rounds():
    import random

    rng = random.Random(0)
    few = summarize([1.0 + rng.gauss(0, 0.05) for _ in range(10)])
    many = summarize([1.0 + rng.gauss(0, 0.05) for _ in range(400)])
    for s in (few, many):
        assert s.ci_low <= s.median <= s.ci_high
    assert many.half_width < few.half_width
    assert many.ci_low < 1.0 < many.ci_high  # the true median is 1.0
    assert many.half_width < 0.02


def test_bootstrap_is_reproducible():
    data = [1.0, 1.2, 0.9, 1.1, 1.05]
    assert summarize(data) == summarize(data)


def test_interleaved_alternates_the_order_drops_warmup_and_reports_each_round():
    calls, rounds_seen = [], []

    def call(name):
        def run():
            calls.append(name)
            assert not gc.isenabled()  # the collector is off during a round
            return len(calls)
        return run

    out = interleaved({"a": call("a"), "b": call("b"), "c": call("c")}, rounds=3, warmup=1,
                      on_round=lambda r, results: rounds_seen.append((r, {k: list(v) for k, v in results.items()})))
    # warm-up round (even: given order), then timed rounds 0 (reversed), 1 (given), 2 (reversed)
    assert calls == list("abc") + list("cba") + list("abc") + list("cba")
    assert out == {"a": [6, 7, 12], "b": [5, 8, 11], "c": [4, 9, 10]}
    assert [r for r, _ in rounds_seen] == [0, 1, 2]
    assert rounds_seen[0][1] == {"a": [6], "b": [5], "c": [4]}
    assert gc.isenabled()


def test_interleaved_turns_the_collector_back_on_after_a_failing_call():
    def boom():
        raise RuntimeError("step failed")

    with pytest.raises(RuntimeError, match="step failed"):
        interleaved({"x": boom}, rounds=1)
    assert gc.isenabled()
    with pytest.raises(ValueError, match="rounds >= 1"):
        interleaved({"x": lambda: 0}, rounds=0)


def test_timed_returns_the_clock_difference_with_sync_around_the_call():
    ticks, events = iter([10.0, 12.5]), []
    run = timed(lambda: events.append("fn"), clock=lambda: next(ticks), sync=lambda: events.append("sync"))
    assert run() == pytest.approx(2.5)
    assert events == ["sync", "fn", "sync"]
