"""The masked linear op against a plain dense reference, on every weight-gradient path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tests.randmask.sddmm_paths import SDDMM_PATHS, force_sddmm_path

from randmask import ops, sddmm
from randmask import pattern as pattern_module
from randmask.masks import bernoulli_mask, make_generator
from randmask.ops import SparsePattern, dense_reference_linear, masked_linear, scatter_delta


@pytest.fixture(params=list(SDDMM_PATHS))
def path(request, monkeypatch):
    """Each weight-gradient path of ``randmask.sddmm.sddmm`` in turn (``tests/randmask/sddmm_paths.py``)."""
    force_sddmm_path(monkeypatch, request.param)
    return request.param


def _setup(transposed: bool, p: float = 0.2, dtype=torch.float64, out_f=7, in_f=5, seed=0):
    torch.manual_seed(seed)
    shape = (in_f, out_f) if transposed else (out_f, in_f)
    pattern = SparsePattern(bernoulli_mask(shape, p, make_generator(seed, "w")), shape, transposed)
    base = torch.randn(shape, dtype=dtype)
    values = (0.1 * torch.randn(pattern.nnz, dtype=dtype)).requires_grad_()
    bias = torch.randn(out_f, dtype=dtype)
    x = torch.randn(3, 4, in_f, dtype=dtype, requires_grad=True)
    return pattern, base, values, bias, x


def _fused(x, values, base, bias, pattern):
    """The op as the layer uses it: the weight holds W0 + values at the kept entries."""
    weight = scatter_delta(base, values.detach(), pattern)
    return masked_linear(x, values, weight, bias, pattern)


@pytest.mark.parametrize("transposed", [False, True])
def test_gradients_equal_dense_reference(path, transposed):
    pattern, base, values, bias, x = _setup(transposed)
    grad_out = torch.randn(3, 4, 7, dtype=torch.float64)
    y = _fused(x, values, base, bias, pattern)
    gx, gv = torch.autograd.grad(y, (x, values), grad_out)
    y_ref = dense_reference_linear(x, base, values, bias, pattern)
    gx_ref, gv_ref = torch.autograd.grad(y_ref, (x, values), grad_out)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(gx, gx_ref)
    torch.testing.assert_close(gv, gv_ref)
    # The reference gradient is the dense dL/dW masked: check it that way too.
    w = base.clone().requires_grad_()
    (gw,) = torch.autograd.grad(ops.dense_linear(x, w, bias, transposed), w, grad_out)
    torch.testing.assert_close(gv, gw.reshape(-1)[pattern.indices])


@pytest.mark.parametrize("transposed", [False, True])
def test_gradcheck_float64(path, transposed):
    pattern, base, values, bias, x = _setup(transposed)
    assert torch.autograd.gradcheck(lambda x_, v_: _fused_live(x_, v_, base, bias, pattern), (x, values))


def _fused_live(x, values, base, bias, pattern):
    # gradcheck perturbs `values` numerically, so the weight must be rebuilt from it each call.
    weight = scatter_delta(base, values.detach(), pattern)
    return masked_linear(x, values, weight, bias, pattern)


@pytest.mark.parametrize("transposed", [False, True])
def test_double_backward_hvp_matches_dense_reference(transposed):
    pattern, base, values, bias, x = _setup(transposed)
    vec = torch.randn_like(values)

    def hvp(fn):
        y = fn(x, values)
        loss = (torch.tanh(y) ** 2).sum() + (x**3).sum()  # non-quadratic in values and x
        (g,) = torch.autograd.grad(loss, values, create_graph=True)
        return torch.autograd.grad((g * vec).sum(), (values, x))

    hv, hx = hvp(lambda x_, v_: _fused(x_, v_, base, bias, pattern))
    hv_ref, hx_ref = hvp(lambda x_, v_: dense_reference_linear(x_, base, v_, bias, pattern))
    torch.testing.assert_close(hv, hv_ref)
    torch.testing.assert_close(hx, hx_ref)  # mixed second derivative d2L/dvalues dx


def test_gradgradcheck():
    pattern, base, values, bias, x = _setup(False, p=0.3)
    assert torch.autograd.gradgradcheck(lambda x_, v_: _fused_live(x_, v_, base, bias, pattern), (x, values))


def test_empty_and_full_mask():
    for p in (1.0,):
        pattern, base, values, bias, x = _setup(False, p=p)
        assert pattern.nnz == 35
        gv = torch.autograd.grad(_fused(x, values, base, bias, pattern).sum(), values)[0]
        gv_ref = torch.autograd.grad(dense_reference_linear(x, base, values, bias, pattern).sum(), values)[0]
        torch.testing.assert_close(gv, gv_ref)
    empty = SparsePattern(torch.empty(0, dtype=torch.int64), (7, 5))
    values = torch.zeros(0, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    y = masked_linear(x, values, torch.randn(7, 5, dtype=torch.float64), None, empty)
    gx, gv = torch.autograd.grad(y.sum(), (x, values))
    assert gv.shape == (0,) and gx.shape == x.shape


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights(path, dtype):
    pattern, base, values, bias, x = _setup(False, p=0.3, dtype=torch.float32, out_f=16, in_f=24)
    weight = scatter_delta(base, values.detach(), pattern).to(dtype)
    xh = x.detach().to(dtype).requires_grad_()
    values32 = values.detach().clone().requires_grad_()
    y = masked_linear(xh, values32, weight, bias.to(dtype), pattern)
    assert y.dtype == dtype
    gx, gv = torch.autograd.grad(y.float().sum(), (xh, values32))
    assert gx.dtype == dtype and gv.dtype == torch.float32
    w_ref = weight.float().requires_grad_()
    (gw,) = torch.autograd.grad(ops.dense_linear(xh.float(), w_ref, bias, False).sum(), w_ref)
    torch.testing.assert_close(gv, gw.reshape(-1)[pattern.indices], atol=0.05, rtol=0.02)


def test_autocast_bf16():
    pattern, base, values, bias, x = _setup(False, p=0.3, dtype=torch.float32, out_f=16, in_f=24)
    values = values.detach().clone().requires_grad_()
    weight = scatter_delta(base, values.detach(), pattern)
    xf = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = masked_linear(xf, values, weight, bias, pattern)
        y_lin = torch.nn.functional.linear(xf, weight, bias)
    assert y.dtype == y_lin.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_lin)
    gx, gv = torch.autograd.grad(y.float().sum(), (xf, values))
    assert gx.dtype == torch.float32 and gv.dtype == torch.float32
    gv_ref = torch.autograd.grad(dense_reference_linear(xf, base, values, bias, pattern).sum(), values)[0]
    torch.testing.assert_close(gv, gv_ref, atol=0.1, rtol=0.02)


@pytest.mark.parametrize("transposed", [False, True])
def test_a_plan_too_large_for_int32_takes_int64_indices_and_a_torch_path(monkeypatch, transposed):
    """The native kernel reads int32 CSRs only: a pattern past INT32_INDEX_LIMIT (here every one) takes a torch path
    on int64 indices and gives the same gradient."""
    monkeypatch.setattr(sddmm, "NATIVE_DENSE_CROSSOVER", 2.0)
    pattern, base, values, bias, x = _setup(transposed, dtype=torch.float32)
    g = torch.randn(12, 7)
    want = dense_reference_linear(x, base, values, bias, pattern)
    want_grad, = torch.autograd.grad(want, values, g.reshape(3, 4, 7))
    monkeypatch.setattr(pattern_module, "INT32_INDEX_LIMIT", 1)
    assert ops.index_dtype(0) == torch.int32 and ops.index_dtype(1) == torch.int64
    assert sddmm.weight_gradient_path(g, x.detach().reshape(-1, 5), pattern) != "native"
    got_grad, = torch.autograd.grad(_fused(x, values, base, bias, pattern), values, g.reshape(3, 4, 7))
    plan = pattern.plan()
    assert plan.crow.dtype == plan.col.dtype == torch.int64
    torch.testing.assert_close(got_grad, want_grad)


def test_a_tuning_constant_that_left_ops_is_refused_by_name(monkeypatch):
    """A copy in ops would read the same and change nothing when set: reading it names where it lives now."""
    with pytest.raises(AttributeError, match=r"randmask.ops.GATHER_MAX_NNZ moved to randmask.sddmm.GATHER_MAX_NNZ"):
        ops.GATHER_MAX_NNZ  # noqa: B018
    with pytest.raises(AttributeError, match="randmask.pattern.INT32_INDEX_LIMIT"):
        getattr(ops, "INT32_INDEX_LIMIT")  # noqa: B009
    with pytest.raises(AttributeError, match="INT32_INDEX_LIMIT"):
        monkeypatch.setattr(ops, "INT32_INDEX_LIMIT", 1)  # a test patching the old home fails, not passes untested


def test_double_backward_under_autocast_reaches_the_cast_input():
    """Hessian-vector products under autocast: the op cast an fp32 input inside its Function, so the copy its SDDMM
    saved had no graph, and every second-derivative term through that input was lost (d2L/dvalues dx off by ~50%,
    and H v off by ~38% on the values of a layer after an fp32 norm). The cast is now recorded by autograd."""
    pattern, base, values, bias, x = _setup(False, p=0.3, dtype=torch.float32, out_f=16, in_f=24)
    values = values.detach().clone().requires_grad_()
    vec = torch.randn_like(values)

    def hvp(fn):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fn(x, values)
        loss = (torch.tanh(y.float()) ** 2).sum() + (x**3).sum()
        (g,) = torch.autograd.grad(loss, values, create_graph=True)
        return torch.autograd.grad((g * vec).sum(), (values, x))

    hv, hx = hvp(lambda x_, v_: _fused(x_, v_, base, bias, pattern))
    hv_ref, hx_ref = hvp(lambda x_, v_: dense_reference_linear(x_, base, v_, bias, pattern))
    torch.testing.assert_close(hv, hv_ref, rtol=0.05, atol=0.05 * hv_ref.abs().max().item())
    torch.testing.assert_close(hx, hx_ref, rtol=0.05, atol=0.05 * hx_ref.abs().max().item())


def test_the_autocast_cast_is_shared_but_never_keeps_a_graph_alive():
    """q, k and v cast one input once and share its storage (one saved copy, not three); the cached cast is made
    under no_grad, so the cache holds no graph behind it."""
    pattern, base, values, bias, x = _setup(False, p=0.3, dtype=torch.float32, out_f=16, in_f=24)
    weight = scatter_delta(base, values.detach(), pattern)
    h = x * 2.0  # a hidden state with a graph behind it
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = [masked_linear(h, values, weight, bias, pattern) for _ in range(3)]
    assert len({o.grad_fn.saved_tensors[0].data_ptr() for o in outs}) == 1
    assert ops._LAST_CAST.cast.grad_fn is None and not ops._LAST_CAST.cast.requires_grad


def test_under_autocast_the_input_gradients_of_q_k_v_are_summed_in_the_inputs_dtype():
    """Sharing one recorded bf16 cast made autograd sum q's, k's and v's input gradients in bf16 before the one
    cast back (dL/dh off by 0.4% of its largest value); each consumer's gradient now returns to fp32 first, as
    with nn.Linear's one cast per call, and the sum matches nn.Linear's."""
    torch.manual_seed(0)
    weights = [torch.randn(64, 64) / 8 for _ in range(3)]
    patterns = [SparsePattern(torch.randperm(64 * 64)[:300].sort().values, (64, 64), False) for _ in range(3)]
    grads_out = [torch.randn(96, 64) for _ in range(3)]
    h = torch.randn(96, 64)

    def input_grad(layer) -> torch.Tensor:
        x = h.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = x * 1.0  # one hidden state that q, k and v all read
            ys = [layer(hidden, i) for i in range(3)]
        sum((y.float() * g).sum() for y, g in zip(ys, grads_out, strict=True)).backward()
        return x.grad

    ours = input_grad(lambda x, i: masked_linear(x, torch.zeros(300, requires_grad=True), weights[i], None,
                                                 patterns[i]))
    plain = input_grad(lambda x, i: F.linear(x, weights[i]))
    torch.testing.assert_close(ours, plain, rtol=1e-6, atol=1e-6)
