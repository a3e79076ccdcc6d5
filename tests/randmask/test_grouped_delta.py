"""The block-diagonal layout of a mixed batch against the fp64 dense reference: values and gradients."""

import pytest
import torch
from tests.randmask.sparse_patterns import dense_delta, random_pattern

from randmask.grouped_delta import block_diagonal, grouped_sparse_delta
from randmask.mixed import group_rows


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("tokens", [1, 7])
def test_matches_the_dense_reference_with_gradients(transposed, tokens):
    shape = (24, 40)
    patterns = {"a": random_pattern(shape, 50, transposed, 0), "b": random_pattern(shape, 1, transposed, 1),
                "c": random_pattern(shape, 0, transposed, 2)}  # an empty mask too
    names = ["b", "a", "__base__", "a", "c", "missing"]  # "missing": no pattern in this layer, gets nothing
    groups = group_rows(names)
    out_f, in_f = patterns["a"].logical_shape
    x = torch.randn(len(names), tokens, in_f, dtype=torch.float64, requires_grad=True)
    values = {k: torch.randn(p.nnz, dtype=torch.float64, requires_grad=True) for k, p in patterns.items()}
    y = grouped_sparse_delta(x, values, block_diagonal(groups.groups, patterns, groups.rows))
    assert y.shape == (len(names), tokens, out_f)
    expected = torch.stack([x[t] @ dense_delta(values[n].detach(), patterns[n]).t() if n in patterns
                            else torch.zeros(tokens, out_f, dtype=torch.float64) for t, n in enumerate(names)])
    torch.testing.assert_close(y, expected, atol=1e-9, rtol=0)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *values.values()], g, allow_unused=True)
    ref = torch.autograd.grad(expected, [x], g)[0]
    torch.testing.assert_close(grads[0], ref, atol=1e-9, rtol=0)
    for (name, v), grad in zip(values.items(), grads[1:]):  # dL/dv_k = sum over its rows and tokens of g * x
        p = patterns[name]
        rows = [t for t, n in enumerate(names) if n == name]
        want = sum((g[t].t() @ x[t].detach()) for t in rows)  # (out, in)
        want = (want.t() if p.transposed else want).reshape(-1)[p.indices]
        torch.testing.assert_close(grad if grad is not None else torch.zeros_like(v), want, atol=1e-9, rtol=0)


def test_fp32_and_bf16_inputs_keep_their_dtype():
    patterns = {"a": random_pattern((16, 8), 20, False, 0)}
    groups = group_rows(["a", "a"])
    block = block_diagonal(groups.groups, patterns, groups.rows)
    x = torch.randn(2, 3, 8)
    values = {"a": torch.randn(20)}
    y32 = grouped_sparse_delta(x, values, block)
    yb = grouped_sparse_delta(x.bfloat16(), values, block)
    assert y32.dtype == torch.float32 and yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.float(), y32, atol=0.05, rtol=0.02)


def test_gathered_values_are_kept_between_calls_only_while_unchanged():
    patterns = {"a": random_pattern((16, 8), 20, False, 0)}
    groups = group_rows(["a", "__base__"])
    block = block_diagonal(groups.groups, patterns, groups.rows)
    x, values = torch.randn(2, 1, 8), {"a": torch.randn(20)}
    with torch.no_grad():
        first = grouped_sparse_delta(x, values, block)
        assert torch.equal(grouped_sparse_delta(x, values, block), first)
        values["a"].mul_(2)  # an in-place edit bumps the version: gathered anew
        torch.testing.assert_close(grouped_sparse_delta(x, values, block), 2 * first)
    assert torch.equal(first[1], torch.zeros_like(first[1]))  # the base row gets no delta
