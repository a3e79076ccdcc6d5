"""Property tests of the samplers and budgets over random shapes, densities and seeds."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from randmask import MaskingError
from randmask.masks import (
    bernoulli_mask,
    column_mask,
    exact_count_mask,
    indices_checksum,
    make_generator,
    per_matrix_density,
    structured_column_counts,
)

PROPS = settings(max_examples=60, deadline=None, derandomize=True, database=None)
shapes = st.tuples(st.integers(1, 300), st.integers(1, 300))
densities = st.floats(1e-4, 1.0)
seeds = st.integers(0, 2**31)
names = st.text("abcdefghij.0123456789_", min_size=1, max_size=30)


def _well_formed(idx: torch.Tensor, n: int) -> None:
    assert idx.dtype == torch.int64 and idx.ndim == 1
    if idx.numel():
        assert int(idx[0]) >= 0 and int(idx[-1]) < n
        assert bool((idx.diff() > 0).all())  # sorted and unique


@PROPS
@given(shapes, densities, seeds, names)
def test_bernoulli_is_well_formed_within_binomial_bounds(shape, p, seed, name):
    n = shape[0] * shape[1]
    idx = bernoulli_mask(shape, p, make_generator(seed, name))
    _well_formed(idx, n)
    mean, sd = n * p, math.sqrt(n * p * (1 - p))
    assert abs(idx.numel() - mean) <= 6 * sd + 1  # P(fail) per example < 1e-8


@PROPS
@given(shapes, densities, seeds, names)
def test_exact_count_is_exact(shape, p, seed, name):
    n = shape[0] * shape[1]
    idx = exact_count_mask(shape, p, make_generator(seed, name))
    _well_formed(idx, n)
    assert idx.numel() == round(p * n)


@PROPS
@given(shapes, densities, seeds, names)
def test_structured_keeps_whole_columns(shape, p, seed, name):
    rows, cols = shape
    idx = column_mask(shape, p, make_generator(seed, name))
    _well_formed(idx, rows * cols)
    kept_cols = torch.unique(idx % cols)
    assert kept_cols.numel() == round(p * cols)
    assert idx.numel() == rows * kept_cols.numel()


@PROPS
@given(st.lists(st.tuples(st.integers(1, 600), st.integers(1, 600), st.floats(0.0, 1.0)), min_size=1, max_size=40),
       seeds)
def test_structured_allocation_meets_the_budget_within_one_column(matrices, seed):
    shapes = [(rows, cols) for rows, cols, _ in matrices]
    entries = [fill * rows * cols for rows, cols, fill in matrices]
    counts = structured_column_counts(shapes, entries, make_generator(seed, "alloc"))
    wanted = [e / rows for e, (rows, _) in zip(entries, shapes)]
    # Each matrix: floor or ceil of its fractional column budget, never more columns than it has.
    assert all(math.floor(w) <= k <= min(math.ceil(w), cols) for k, w, (_, cols) in zip(counts, wanted, shapes))
    # Total: the fractional parts' sum, rounded down or up (systematic sampling).
    assert abs(sum(counts) - sum(wanted)) < 1 + 1e-9
    assert counts == structured_column_counts(shapes, entries, make_generator(seed, "alloc"))


def test_structured_allocation_is_unbiased_per_matrix():
    # 60 matrices each due 0.3 of a column: each must get its column 30% of the time, over seeds.
    shapes, entries = [(100, 50)] * 60, [30.0] * 60
    hits = torch.zeros(60)
    for seed in range(2000):
        counts = structured_column_counts(shapes, entries, make_generator(seed, "alloc"))
        assert sum(counts) == 18  # 60 * 0.3, exactly: the fractions sum to an integer
        hits += torch.tensor(counts, dtype=torch.float32)
    rate = hits / 2000  # binomial sd of a rate: sqrt(0.3*0.7/2000) = 0.010
    assert bool(((rate - 0.3).abs() < 0.06).all()), rate


@PROPS
@given(shapes, densities, seeds, names, st.sampled_from([bernoulli_mask, exact_count_mask, column_mask]))
def test_same_seed_same_bytes(shape, p, seed, name, sampler):
    a = sampler(shape, p, make_generator(seed, name))
    b = sampler(shape, p, make_generator(seed, name))
    assert indices_checksum(a) == indices_checksum(b) and torch.equal(a, b)


@PROPS
@given(st.floats(1e-6, 1.0), st.integers(10, 10**9), st.lists(st.integers(1, 10**6), min_size=1, max_size=20))
def test_budget_spreads_evenly_or_refuses(ratio, total, sizes):
    try:
        dens = per_matrix_density(ratio, total, sizes)
    except MaskingError:
        per = ratio * total / len(sizes)
        assert per < 1.0 or per > min(sizes)
        return
    expected = [d * s for d, s in zip(dens, sizes)]
    assert all(0.0 < d <= 1.0 for d in dens)
    assert expected == pytest.approx([ratio * total / len(sizes)] * len(sizes))
