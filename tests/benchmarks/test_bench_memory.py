"""The memory phase on the quick model: exact gradient and optimizer bytes, and a peak that sees them."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_memory  # noqa: E402
from bench_models import build_base, trainable_count  # noqa: E402


def test_full_fine_tuning_shows_its_gradients_and_adam_moments():
    n = trainable_count(build_base(quick=True, precision="fp32"))
    # A fresh interpreter: in the test process, pages that earlier tests freed stay resident and the
    # allocator reuses them, so the peak above the load would miss the gradients and moments.
    full = bench_memory.measure_in_subprocess("full", "fp32", quick=True, threads=1)
    assert full["trainable"] == n
    assert full["grad_bytes"] == 4 * n  # fp32 gradients
    assert full["optimizer_state_bytes"] == 8 * n  # AdamW exp_avg + exp_avg_sq
    if full["hwm_reset"]:  # the peak above the load covers at least gradients + moments
        assert full["peak_rss_mb"] * 2**20 >= 0.9 * 12 * n


def test_randmask_has_8_bytes_of_optimizer_state_per_entry_at_bf16_true():
    r = bench_memory.measure("randmask 1% all-linear", "bf16-true", quick=True, threads=1)
    assert r["trainable"] > 0
    assert r["optimizer_state_bytes"] == 8 * r["trainable"]  # fp32 moments over a bf16 base
    assert r["grad_bytes"] == 4 * r["trainable"]


def test_floor_trains_nothing():
    r = bench_memory.measure("floor", "bf16-mixed", quick=True, threads=1)
    assert r["trainable"] == r["grad_bytes"] == r["optimizer_state_bytes"] == 0
