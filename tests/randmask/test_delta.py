"""The delta path's SpMM against the fp64 dense reference: values, x gradients, layouts, edge cases."""

import pytest
import torch
from tests.randmask.sparse_patterns import dense_delta, random_pattern

from randmask.delta import sparse_delta, sparse_delta_reference


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("nnz", [0, 1, 17, 300])
@pytest.mark.parametrize("tokens", [1, 65])
def test_matches_dense_reference(transposed, nnz, tokens):
    pattern = random_pattern((24, 40), nnz, transposed)
    out_f, in_f = pattern.logical_shape
    x = torch.randn(2, tokens, in_f, requires_grad=True)
    values = torch.randn(nnz, requires_grad=True)
    y = sparse_delta(x, values, pattern)
    assert y.shape == (2, tokens, out_f)
    d = dense_delta(values.detach(), pattern)
    torch.testing.assert_close(y.double(), x.detach().double() @ d.t(), atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    gx, gv = torch.autograd.grad(y, (x, values), g)
    g2d, x2d = g.reshape(-1, out_f).double(), x.detach().reshape(-1, in_f).double()
    torch.testing.assert_close(gx.double(), (g2d @ d).reshape(x.shape), atol=1e-5, rtol=1e-5)
    dense_grad = g2d.t() @ x2d  # (out, in): dL/dD
    stored = dense_grad.t() if transposed else dense_grad
    torch.testing.assert_close(gv.double(), stored.reshape(-1)[pattern.indices], atol=1e-4, rtol=1e-5)


def test_reference_agrees_and_bf16_runs():
    pattern = random_pattern((32, 48), 100)
    x, values = torch.randn(5, 48), torch.randn(100)
    torch.testing.assert_close(sparse_delta(x, values, pattern), sparse_delta_reference(x, values, pattern))
    yb = sparse_delta(x.bfloat16(), values, pattern)
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.float(), sparse_delta(x, values, pattern), atol=0.1, rtol=0.02)


def test_wrong_shapes_are_refused():
    pattern = random_pattern((8, 8), 4)
    with pytest.raises(ValueError, match="values has shape"):
        sparse_delta(torch.randn(2, 8), torch.randn(5), pattern)
    with pytest.raises(ValueError, match="features"):
        sparse_delta(torch.randn(2, 9), torch.randn(4), pattern)


def test_under_cpu_autocast_the_output_takes_the_autocast_dtype():
    # The SpMM runs in fp32 with autocast off (MKL's CSR kernel has no bf16); its output is bf16 like
    # nn.Linear's under autocast, and the gradients match the fp32 ones.
    pattern = random_pattern((32, 48), 100)
    x = torch.randn(5, 48, requires_grad=True)
    values = torch.randn(100, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = sparse_delta(x, values, pattern)
    assert y.dtype == torch.bfloat16
    ref = sparse_delta(x, values, pattern)
    torch.testing.assert_close(y.float(), ref, atol=0.05, rtol=0.02)
    g = torch.randn(5, 32)
    gx, gv = torch.autograd.grad(y, (x, values), g.bfloat16())
    rx, rv = torch.autograd.grad(ref, (x, values), g.bfloat16().float())
    assert gx.dtype == torch.float32 and gv.dtype == torch.float32
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gv, rv)


@pytest.mark.parametrize("limit", [2 ** 31, 1])  # 1: every layout takes int64 indices, as one past 2^31 would
def test_a_forward_without_gradients_keeps_one_int32_csr_and_both_index_widths_agree(monkeypatch, limit):
    """Serving many adapters keeps one CSR per adapter: D only (D^T is built for the first backward), int32."""
    import randmask.delta as delta
    import randmask.pattern

    monkeypatch.setattr(randmask.pattern, "INT32_INDEX_LIMIT", limit)
    pattern = random_pattern((24, 40), 60, True, 3)  # Conv1D: the stored order is not D's CSR order
    values = torch.randn(60, dtype=torch.float64, requires_grad=True)
    x = torch.randn(5, 24, dtype=torch.float64, requires_grad=True)  # logical (out 40, in 24)
    with torch.no_grad():
        y = sparse_delta(x, values, pattern)
    layout = delta._LAYOUTS[pattern]
    assert layout.t is None and layout.d.order is not None
    index = torch.int32 if limit > 1 else torch.int64
    assert {layout.d.crow.dtype, layout.d.col.dtype, layout.d.order.dtype} == {index}
    torch.testing.assert_close(y, x.detach() @ dense_delta(values.detach(), pattern).t(), atol=1e-12, rtol=0)
    gx, gv = torch.autograd.grad(sparse_delta(x, values, pattern).square().sum(), [x, values])
    rx, rv = torch.autograd.grad(sparse_delta_reference(x, values, pattern).square().sum(), [x, values])
    assert layout.t is not None and layout.t.col.dtype == index  # dL/dx built D^T
    torch.testing.assert_close(gx, rx, atol=1e-10, rtol=0)
    torch.testing.assert_close(gv, rv, atol=1e-10, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("transposed", [False, True])
def test_the_dense_first_orientation_matches_the_reference(monkeypatch, dtype, transposed):
    """``torch.mm(x, csr(D^T))`` and ``torch.mm(g, csr(D))``, from DENSE_FIRST_MIN_OUTPUT (T x out) on CPU: the same
    forward, dx and dvalues as the reference, and a contiguous output (no strided (T, out) view to add)."""
    import randmask.delta as delta

    pattern = random_pattern((24, 40), 50, transposed, 5)
    x = torch.randn(3, 7, pattern.logical_shape[1], dtype=dtype, requires_grad=True)
    values = torch.randn(50, dtype=dtype, requires_grad=True)
    assert not delta.dense_first(x.reshape(21, -1), pattern)  # 21 rows: far below the measured crossover
    monkeypatch.setattr(delta, "DENSE_FIRST_MIN_OUTPUT", 8)
    assert delta.dense_first(x.reshape(21, -1), pattern)
    y = sparse_delta(x, values, pattern)
    assert y.is_contiguous()
    tol = {"atol": 1e-10, "rtol": 0} if dtype == torch.float64 else {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(y, sparse_delta_reference(x, values, pattern), **tol)
    gx, gv = torch.autograd.grad(y.square().sum(), [x, values])
    rx, rv = torch.autograd.grad(sparse_delta_reference(x, values, pattern).square().sum(), [x, values])
    torch.testing.assert_close(gx, rx, **tol)
    torch.testing.assert_close(gv, rv, **tol)
    monkeypatch.setattr(delta, "DENSE_FIRST_MAX_PER_ROW", 1)  # 50 entries > 1 per row of 24 (or 40): CSR-first
    assert not delta.dense_first(x.reshape(21, -1), pattern)


@pytest.mark.parametrize("transposed", [False, True])
def test_double_backward_passes_gradgradcheck_and_matches_the_reference(transposed):
    """backward(create_graph=True) through the fused op (Hessian-vector products on a quantized base or a tied head):
    dL/dx is bilinear in (g, values) and dL/dvalues in (g, x), and both terms reach the second derivative."""
    pattern = random_pattern((12, 20), 40, transposed, 2)
    out_f, in_f = pattern.logical_shape
    x = torch.randn(2, 3, in_f, dtype=torch.float64, requires_grad=True)
    values = torch.randn(40, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda a, b: sparse_delta(a, b, pattern), (x, values))

    def hvp(op):  # a loss with nonzero second derivatives in both x and values
        grads = torch.autograd.grad(op(x, values, pattern).tanh().sum(), [x, values], create_graph=True)
        return torch.autograd.grad(sum(g.sum() for g in grads), [x, values])

    for got, want in zip(hvp(sparse_delta), hvp(sparse_delta_reference)):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
