"""The masked linear op against a plain dense reference, on every weight-gradient path."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from randmask import native, ops
from randmask.masks import bernoulli_mask, make_generator
from randmask.ops import SparsePattern, dense_reference_linear, masked_linear, scatter_delta


@pytest.fixture(params=["native", "gather", "compact", "compact-all", "dense"])
def path(request, monkeypatch):
    """Force each weight-gradient path of ``ops.sddmm`` (compact: touched rows/columns only; -all: every one).
    The native kernel takes fp32 work (fp32/bf16 inputs) only: fp64 and fp16 tests fall back from it."""
    if request.param == "native":
        monkeypatch.setattr(ops, "NATIVE_DENSE_CROSSOVER", 2.0)
        return request.param
    monkeypatch.setenv(native.DISABLE_ENV, "0")
    if request.param == "gather":
        monkeypatch.setattr(ops, "GATHER_MAX_NNZ", 10**9)
        monkeypatch.setattr(ops, "GATHER_CHUNK_ELEMENTS", 7)  # several token chunks
    else:
        monkeypatch.setattr(ops, "GATHER_MAX_NNZ", -1)
        monkeypatch.setattr(ops, "DENSE_GRAD_CROSSOVER", -1.0 if request.param == "dense" else 2.0)
        monkeypatch.setattr(ops, "COMPACT_MAX_FRACTION", 1.0 if request.param == "compact" else -1.0)
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


def _sddmm_reference(g: torch.Tensor, x: torch.Tensor, pattern: SparsePattern) -> torch.Tensor:
    """Dense g^T x in float64, at the kept entries (stored-weight order)."""
    dense = g.double().t() @ x.double()  # (out, in)
    return (dense.t() if pattern.transposed else dense).reshape(-1)[pattern.indices]


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
    expected = _sddmm_reference(g, x, pattern)
    settings_by_path = {
        "native": {"NATIVE_DENSE_CROSSOVER": 2.0},
        "gather": {"GATHER_MAX_NNZ": 10**9, "GATHER_CHUNK_ELEMENTS": 5},
        "compact": {"GATHER_MAX_NNZ": -1, "DENSE_GRAD_CROSSOVER": 2.0, "COMPACT_MAX_FRACTION": 1.0},
        "compact-all": {"GATHER_MAX_NNZ": -1, "DENSE_GRAD_CROSSOVER": 2.0, "COMPACT_MAX_FRACTION": -1.0},
        "dense": {"GATHER_MAX_NNZ": -1, "DENSE_GRAD_CROSSOVER": -1.0},
    }
    for name, overrides in settings_by_path.items():
        if name == "native" and not native.available():
            continue  # test_native.py fails where a compiler exists and the kernel does not build
        with pytest.MonkeyPatch.context() as mp:
            if name != "native":
                mp.setenv(native.DISABLE_ENV, "0")
            for attr, value in overrides.items():
                mp.setattr(ops, attr, value)
            got = ops.sddmm(g, x, SparsePattern(pattern.indices, shape, transposed))  # fresh plan per path
        assert got.dtype == torch.float32 and got.shape == (pattern.nnz,), name
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5, msg=name)


def test_compact_plan_touches_only_used_rows_and_reorders():
    """A Conv1D-style (transposed) pattern with few used features: compacted, and its CSR order differs."""
    shape = (50, 40)  # stored (in, out)
    indices = torch.tensor([3 * 40 + 7, 3 * 40 + 2, 9 * 40 + 7, 20 * 40 + 39]).sort().values
    pattern = SparsePattern(indices, shape, transposed=True)
    plan = pattern.plan()
    assert plan.lhs_touched is not None and plan.rhs_touched is not None
    assert plan.lhs_touched.numel() + plan.rhs_touched.numel() == 3 + 3  # outputs {2, 7, 39}, inputs {3, 9, 20}
    assert plan.col.dtype == plan.crow.dtype == torch.int32 and (plan.order is None or plan.order.dtype == torch.int32)
    g, x = torch.randn(6, 40), torch.randn(6, 50)
    torch.testing.assert_close(ops._sddmm_compact(g, x, pattern, torch.float32).double(),
                               _sddmm_reference(g, x, pattern), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("shape", "transposed", "p"), [((96, 40), False, 0.05), ((40, 96), True, 0.05),
                                                         ((96, 40), False, 0.005)])
def test_the_compact_path_in_row_blocks_matches(monkeypatch, shape, transposed, p):
    """Blocks of 3 lhs rows (touched or all, in stored or CSR order): the same values as one block."""
    pattern = SparsePattern(bernoulli_mask(shape, p, make_generator(2, "w")), shape, transposed)
    out_f, in_f = pattern.logical_shape
    g, x = torch.randn(10, out_f).bfloat16(), torch.randn(10, in_f).bfloat16()  # half inputs go in blocks
    whole = ops._sddmm_compact(g, x, pattern, torch.float32)
    monkeypatch.setattr(ops, "COMPACT_CHUNK_BYTES", 3 * 10 * 4)
    blocks = ops._sddmm_compact(g, x, SparsePattern(pattern.indices, shape, transposed), torch.float32)
    torch.testing.assert_close(blocks, whole, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(blocks.double(), _sddmm_reference(g, x, pattern), rtol=1e-5, atol=1e-5)


def test_a_pattern_keeps_no_per_entry_tensors_beyond_its_plan():
    """At 1% of every linear layer the per-entry index tensors are the memory overhead: the pattern holds
    its indices and the plan 4 bytes per entry (CSR column), nothing else per entry."""
    shape = (64, 48)
    pattern = SparsePattern(bernoulli_mask(shape, 0.05, make_generator(0, "w")), shape)
    plan = pattern.plan()
    per_entry = [t for t in vars(plan).values() if isinstance(t, torch.Tensor) and t.numel() == pattern.nnz]
    assert [t.dtype for t in per_entry] == [torch.int32]  # the column; Linear keeps row-major order: no order
    assert not any(isinstance(v, torch.Tensor) for k, v in vars(pattern).items() if k != "indices")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_accumulate_in_fp32(path, dtype):
    """bf16/fp16 g and x: the result is the fp32 sum of exact products of the half values, on every path
    (a half-precision accumulation over 4096 tokens would be off by far more than this tolerance)."""
    shape = (24, 16)
    pattern = SparsePattern(bernoulli_mask(shape, 0.3, make_generator(1, "w")), shape)
    g = (torch.randn(4096, 24) + 3.0).to(dtype)  # a large common mean: a half-precision running sum drifts
    x = (torch.randn(4096, 16) + 3.0).to(dtype)
    got = ops.sddmm(g, x, pattern)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _sddmm_reference(g, x, pattern), rtol=2e-5, atol=1e-3)


def test_the_path_fixture_forces_the_path_it_names(path):
    """``weight_gradient_path`` reports the path each fixture forces (fp32 work; native only where it builds)."""
    pattern, _, _, _, x = _setup(False, dtype=torch.float32)
    g = torch.randn(12, 7)
    got = ops.weight_gradient_path(g, x.detach().reshape(-1, 5), pattern)
    if path == "native" and not native.available():
        pytest.skip("no C compiler here: the native kernel is not built")
    assert got == path.removesuffix("-all")


def test_the_weight_gradient_kernel_is_native_only_on_the_cpu():
    assert ops.weight_gradient_kernel("cuda") in ("triton", "torch")  # triton where randmask[gpu] is installed
    assert ops.weight_gradient_kernel("cpu") == ("native" if native.available() else "torch")
    empty = SparsePattern(torch.zeros(0, dtype=torch.long), (7, 5), False)
    assert ops.weight_gradient_path(torch.randn(3, 7), torch.randn(3, 5), empty) == "empty"



@pytest.mark.parametrize("transposed", [False, True])
def test_a_plan_too_large_for_int32_takes_int64_indices_and_a_torch_path(monkeypatch, transposed):
    """The native kernel reads int32 CSRs only: a pattern past INT32_INDEX_LIMIT (here every one) takes a torch path
    on int64 indices and gives the same gradient."""
    monkeypatch.setattr(ops, "NATIVE_DENSE_CROSSOVER", 2.0)
    pattern, base, values, bias, x = _setup(transposed, dtype=torch.float32)
    g = torch.randn(12, 7)
    want = dense_reference_linear(x, base, values, bias, pattern)
    want_grad, = torch.autograd.grad(want, values, g.reshape(3, 4, 7))
    monkeypatch.setattr(ops, "INT32_INDEX_LIMIT", 1)
    assert ops.index_dtype(0) == torch.int32 and ops.index_dtype(1) == torch.int64
    assert ops.weight_gradient_path(g, x.detach().reshape(-1, 5), pattern) != "native"
    got_grad, = torch.autograd.grad(_fused(x, values, base, bias, pattern), values, g.reshape(3, 4, 7))
    plan = pattern.plan()
    assert plan.crow.dtype == plan.col.dtype == torch.int64
    torch.testing.assert_close(got_grad, want_grad)

def test_a_bool_mask_is_not_taken_for_indices():
    with pytest.raises(TypeError, match="1-D int32/int64"):
        SparsePattern(torch.ones(7, 5, dtype=torch.bool), (7, 5), False)


def test_logical_shape_is_out_by_in_for_both_storages():
    assert ops.logical_shape((8, 3), transposed=False) == (8, 3)  # nn.Linear stores (out, in)
    assert ops.logical_shape((3, 8), transposed=True) == (8, 3)  # GPT-2's Conv1D stores (in, out)
    mask = torch.zeros(3, 8, dtype=torch.bool)
    mask[0, 1] = True
    assert ops.SparsePattern(mask.flatten().nonzero().squeeze(1), (3, 8), transposed=True).logical_shape == (8, 3)
