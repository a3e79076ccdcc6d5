"""The masked weight gradient (``randmask.sddmm``): every path against fp64 dense gᵀx, and the path choice."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.randmask.sddmm_paths import SDDMM_PATHS, force_sddmm_path, sddmm_reference

from randmask import native, sddmm
from randmask.masks import bernoulli_mask, make_generator
from randmask.pattern import SparsePattern


@pytest.fixture(params=list(SDDMM_PATHS))
def path(request, monkeypatch):
    """Each weight-gradient path in turn (``tests/randmask/sddmm_paths.py``)."""
    force_sddmm_path(monkeypatch, request.param)
    return request.param


@settings(max_examples=25, deadline=None)
@given(
    out_f=st.integers(1, 40), in_f=st.integers(1, 40), tokens=st.integers(1, 30),
    p=st.sampled_from([0.0, 0.01, 0.05, 0.3, 1.0]), transposed=st.booleans(), seed=st.integers(0, 10**6),
)
def test_sddmm_every_path_matches_dense(out_f, in_f, tokens, p, transposed, seed):
    """Every path (and both compact layouts) on random shapes, empty and full masks included."""
    shape = (in_f, out_f) if transposed else (out_f, in_f)
    indices = bernoulli_mask(shape, p, make_generator(seed, "w")) if p > 0 else torch.empty(0, dtype=torch.int64)
    pattern = SparsePattern(indices, shape, transposed)
    gen = torch.Generator().manual_seed(seed)
    g, x = torch.randn(tokens, out_f, generator=gen), torch.randn(tokens, in_f, generator=gen)
    expected = sddmm_reference(g, x, pattern)
    for name in SDDMM_PATHS:
        if name == "native" and not native.available():
            continue  # test_native.py fails where a compiler exists and the kernel does not build
        with pytest.MonkeyPatch.context() as mp:
            force_sddmm_path(mp, name)
            got = sddmm.sddmm(g, x, SparsePattern(pattern.indices, shape, transposed))  # fresh plan per path
        assert got.dtype == torch.float32 and got.shape == (pattern.nnz,), name
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize(("shape", "transposed", "p"), [((96, 40), False, 0.05), ((40, 96), True, 0.05),
                                                         ((96, 40), False, 0.005)])
def test_the_compact_path_in_row_blocks_matches(monkeypatch, shape, transposed, p):
    """Blocks of 3 lhs rows (touched or all, in stored or CSR order): the same values as one block."""
    pattern = SparsePattern(bernoulli_mask(shape, p, make_generator(2, "w")), shape, transposed)
    out_f, in_f = pattern.logical_shape
    g, x = torch.randn(10, out_f).bfloat16(), torch.randn(10, in_f).bfloat16()  # half inputs go in blocks
    whole = sddmm.sddmm_compact(g, x, pattern, torch.float32)
    monkeypatch.setattr(sddmm, "COMPACT_CHUNK_BYTES", 3 * 10 * 4)
    blocks = sddmm.sddmm_compact(g, x, SparsePattern(pattern.indices, shape, transposed), torch.float32)
    torch.testing.assert_close(blocks, whole, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(blocks.double(), sddmm_reference(g, x, pattern), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_accumulate_in_fp32(path, dtype):
    """bf16/fp16 g and x: the result is the fp32 sum of exact products of the half values, on every path
    (a half-precision accumulation over 4096 tokens would be off by far more than this tolerance)."""
    shape = (24, 16)
    pattern = SparsePattern(bernoulli_mask(shape, 0.3, make_generator(1, "w")), shape)
    g = (torch.randn(4096, 24) + 3.0).to(dtype)  # a large common mean: a half-precision running sum drifts
    x = (torch.randn(4096, 16) + 3.0).to(dtype)
    got = sddmm.sddmm(g, x, pattern)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), sddmm_reference(g, x, pattern), rtol=2e-5, atol=1e-3)


def test_the_path_fixture_forces_the_path_it_names(path):
    """``weight_gradient_path`` reports the path each fixture forces (fp32 work; native only where it builds)."""
    pattern = SparsePattern(bernoulli_mask((7, 5), 0.2, make_generator(0, "w")), (7, 5))
    got = sddmm.weight_gradient_path(torch.randn(12, 7), torch.randn(12, 5), pattern)
    if path == "native" and not native.available():
        pytest.skip("no C compiler here: the native kernel is not built")
    assert got == path.removesuffix("-all")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_no_tokens_give_zero_gradients_on_every_path(path, dtype):
    """A batch of 0 tokens: (nnz,) zeros on every path and dtype. The compact path's half-input blocks divided by
    the token count (ZeroDivisionError for bf16/fp16 under the torch kernel, fp16 under the native one)."""
    shape = (64, 64)
    pattern = SparsePattern(bernoulli_mask(shape, 0.02, make_generator(3, "w")), shape)
    got = sddmm.sddmm(torch.zeros(0, 64, dtype=dtype), torch.zeros(0, 64, dtype=dtype), pattern)
    assert got.shape == (pattern.nnz,) and not got.any()
