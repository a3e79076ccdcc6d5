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
