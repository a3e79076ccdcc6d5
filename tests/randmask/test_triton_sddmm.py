"""The Triton SDDMM (randmask.triton_sddmm) on CPU tensors under TRITON_INTERPRET=1, against fp64 dense g^T x,
and its place in the kernel switch (the switch itself: test_kernels.py). Skipped where triton is not installed
(the `gpu` and `dev` extras bring it)."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch

from randmask import native, ops
from randmask.masks import bernoulli_mask, make_generator
from randmask.ops import SparsePattern, dense_reference_linear, masked_linear, scatter_delta

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def interpreted(monkeypatch):
    """randmask.triton_sddmm with RANDMASK_KERNEL=triton: compiled on a GPU, else in Triton's CPU interpreter
    (tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported)."""
    pytest.importorskip("triton")
    module = importlib.import_module("randmask.triton_sddmm")
    if DEVICE == "cpu" and type(module._sddmm_rows_kernel).__name__ != "InterpretedFunction":
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set (see tests/conftest.py)")
    monkeypatch.setenv(ops.KERNEL_ENV, "triton")
    monkeypatch.delenv(native.DISABLE_ENV, raising=False)
    return module


def _reference(g: torch.Tensor, x: torch.Tensor, pattern: SparsePattern) -> torch.Tensor:
    """Dense g^T x in float64 at the kept entries (stored-weight order)."""
    dense = g.cpu().double().t() @ x.cpu().double()  # (out, in)
    return (dense.t() if pattern.transposed else dense).reshape(-1)[pattern.indices.cpu()]


def _pattern(out_f: int, in_f: int, transposed: bool, p: float | None = None, nnz: int | None = None,
             seed: int = 0) -> SparsePattern:
    shape = (in_f, out_f) if transposed else (out_f, in_f)
    if nnz is not None:
        indices = torch.randperm(shape[0] * shape[1], generator=torch.Generator().manual_seed(seed))[:nnz].sort().values
    else:
        indices = bernoulli_mask(shape, p, make_generator(seed, "w"))
    return SparsePattern(indices.to(DEVICE), shape, transposed)


def _check(g: torch.Tensor, x: torch.Tensor, pattern: SparsePattern) -> None:
    g, x = g.to(DEVICE), x.to(DEVICE)
    assert ops.weight_gradient_path(g, x, pattern) == ("triton" if pattern.nnz else "empty")
    got = ops.sddmm(g, x, pattern)
    assert got.dtype == torch.float32 and got.shape == (pattern.nnz,)
    torch.testing.assert_close(got.cpu().double(), _reference(g, x, pattern), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("tokens", [1, 63, 64, 65, 1000])
def test_token_counts_around_the_block(interpreted, tokens, transposed, dtype):
    gen = torch.Generator().manual_seed(tokens)
    g, x = torch.randn(tokens, 8, generator=gen).to(dtype), torch.randn(tokens, 12, generator=gen).to(dtype)
    _check(g, x, _pattern(8, 12, transposed, p=0.2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("budget", [{"nnz": 0}, {"nnz": 1}, {"p": 0.001}, {"p": 0.01}, {"p": 0.3}],
                         ids=["nnz0", "nnz1", "p0.001", "p0.01", "p0.3"])
def test_densities(interpreted, budget, transposed, dtype):
    """Up to 30%: at 0.1-1% few features are touched, so the plan renumbers them; 100 inputs x 24 outputs put the
    inputs on the CSR's lhs (for the Conv1D, whose stored order is input-major, in stored order)."""
    gen = torch.Generator().manual_seed(7)
    g, x = torch.randn(65, 24, generator=gen).to(dtype), torch.randn(65, 100, generator=gen).to(dtype)
    _check(g, x, _pattern(24, 100, transposed, **budget))


def test_a_row_longer_than_one_program_is_split(interpreted):
    """Output row 0 holds all 140 inputs (plus the diagonal): three programs of at most 64 entries on one row."""
    gen = torch.Generator().manual_seed(3)
    n = 140
    indices = torch.cat([torch.arange(n), torch.arange(1, n) * (n + 1)])  # row 0, then the diagonal
    pattern = SparsePattern(indices.to(DEVICE), (n, n), False)
    counts = (pattern.plan().crow[1:] - pattern.plan().crow[:-1])
    assert int(counts.max()) == n > 2 * interpreted.MAX_BLOCK_E
    _check(torch.randn(3, n, generator=gen), torch.randn(3, n, generator=gen), pattern)


def test_work_items_cover_every_entry_once(interpreted):
    crow = torch.tensor([0, 0, 3, 3, 70, 71])
    rows, starts = interpreted.work_items(crow, 32)
    assert rows.tolist() == [1, 3, 3, 3, 4] and starts.tolist() == [0, 3, 35, 67, 70]


def test_half_inputs_accumulate_in_fp32(interpreted):
    """A large common mean over 2048 tokens: a bf16/fp16 running sum would drift far past this tolerance."""
    pattern = _pattern(6, 4, False, p=0.5, seed=1)
    for dtype in (torch.bfloat16, torch.float16):
        g, x = (torch.randn(2048, 6) + 3.0).to(DEVICE, dtype), (torch.randn(2048, 4) + 3.0).to(DEVICE, dtype)
        got = ops.sddmm(g, x, pattern).cpu()
        torch.testing.assert_close(got.double(), _reference(g, x, pattern), rtol=2e-5, atol=1e-3)


@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d"])
def test_the_masked_op_backward_runs_the_kernel(interpreted, transposed):
    """Through MaskedLinearFunction: the values gradient equals the dense reference's masked dL/dW."""
    torch.manual_seed(0)
    pattern = _pattern(12, 20, transposed, p=0.2)
    base = torch.randn(pattern.shape, device=DEVICE)
    values = (0.1 * torch.randn(pattern.nnz, device=DEVICE)).requires_grad_()
    x = torch.randn(3, 5, 20, device=DEVICE, requires_grad=True)
    grad_out = torch.randn(3, 5, 12, device=DEVICE)
    y = masked_linear(x, values, scatter_delta(base, values.detach(), pattern), None, pattern)
    gx, gv = torch.autograd.grad(y, (x, values), grad_out)
    cpu = SparsePattern(pattern.indices.cpu(), pattern.shape, transposed)
    x64, v64 = x.detach().cpu().double().requires_grad_(), values.detach().cpu().double().requires_grad_()
    ref = dense_reference_linear(x64, base.cpu().double(), v64, None, cpu)
    gx_ref, gv_ref = torch.autograd.grad(ref, (x64, v64), grad_out.cpu().double())
    torch.testing.assert_close(gv.cpu().double(), gv_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx.cpu().double(), gx_ref, rtol=1e-5, atol=1e-5)


def test_fp64_work_takes_the_torch_paths(interpreted):
    pattern = _pattern(8, 8, False, p=0.2)
    g, x = torch.randn(5, 8, dtype=torch.float64, device=DEVICE), torch.randn(5, 8, dtype=torch.float64, device=DEVICE)
    assert ops.weight_gradient_kernel(DEVICE, torch.float64) == "torch"
    assert ops.weight_gradient_path(g, x, pattern) in ("gather", "compact", "dense")


def test_import_randmask_does_not_import_triton():
    import subprocess

    code = "import randmask, randmask.ops, sys; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
