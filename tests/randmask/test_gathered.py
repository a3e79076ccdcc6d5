"""The gathered layout of a mixed batch against the fp64 dense reference: values, gradients, tables."""

import gc
import weakref
from types import SimpleNamespace

import pytest
import torch
from tests.randmask.sparse_patterns import dense_delta, random_pattern

import randmask.gathered
from randmask.gathered import IndexTables, gathered_delta, layer_tables
from randmask.mixed import group_rows
from randmask.ops import index_dtype


class _Adapter(SimpleNamespace):
    """What the gathered layout reads of a MaskAdapter (a class of its own: the layer cache holds weak references)."""

    __slots__ = ("__weakref__",)


def _adapter(pattern, values):
    return _Adapter(nnz=pattern.nnz, values=values, indices=pattern.indices, stored_shape=pattern.shape,
                    transposed=pattern.transposed, pattern=lambda: pattern)


@pytest.mark.parametrize("cached_patterns", [True, False])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("tokens", [1, 7])
def test_matches_the_dense_reference_with_gradients(transposed, tokens, cached_patterns):
    shape = (24, 40)
    patterns = {"a": random_pattern(shape, 50, transposed, 0), "b": random_pattern(shape, 1, transposed, 1),
                "c": random_pattern(shape, 0, transposed, 2)}  # an empty mask too
    names = ["b", "a", "__base__", "a", "c", "missing"]  # "missing": no adapter in this layer, gets nothing
    groups = group_rows(names)
    out_f, in_f = patterns["a"].logical_shape
    x = torch.randn(len(names), tokens, in_f, dtype=torch.float64, requires_grad=True)
    values = {k: torch.randn(p.nnz, dtype=torch.float64, requires_grad=True) for k, p in patterns.items()}
    adapters = {k: _adapter(p, values[k]) for k, p in patterns.items()}
    members = [adapters.get(name) for name, _ in groups.groups]
    tables = IndexTables.build(members, x.device, cached_patterns=cached_patterns)
    assert tables.out_index.shape == (len(groups.groups) + 1, 50)  # padded to the largest member, plus "none"
    y = gathered_delta(x, out_f, tables, groups.row_members(x.device))
    assert y.shape == (len(names), tokens, out_f) and y.dtype == torch.float64
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


def test_tables_keep_the_narrowest_index_dtype_and_compute_alike_in_a_wider_one(monkeypatch):
    # Features 1, 32768, 32769, 2^31 and 2^31 + 1: the largest index is one less.
    assert [index_dtype(n - 1, smallest=torch.int16) for n in (1, 32768, 32769, 2**31, 2**31 + 1)] == [
        torch.int16, torch.int16, torch.int32, torch.int32, torch.int64]
    patterns = [random_pattern((40, 24), 60, transposed, seed) for seed, transposed in enumerate([False, True])]
    adapters = [_adapter(p, torch.randn(p.nnz, dtype=torch.float64)) for p in patterns[:1]]
    conv = [_adapter(patterns[1], torch.randn(patterns[1].nnz, dtype=torch.float64))]
    for members, in_f, out_f in ((adapters, 24, 40), (conv, 40, 24)):  # Linear (out, in) and Conv1D (in, out)
        tables = IndexTables.build(members, torch.device("cpu"))
        assert tables.out_index.dtype == tables.in_index.dtype == torch.int16
        x, rows = torch.randn(2, 3, in_f, dtype=torch.float64), torch.tensor([0, 1])
        expected = gathered_delta(x, out_f, tables, rows)
        monkeypatch.setattr(randmask.gathered, "index_dtype", lambda largest, smallest: torch.int64)
        wide = IndexTables.build(members, torch.device("cpu"))
        monkeypatch.undo()
        assert wide.in_index.dtype == torch.int64 and torch.equal(gathered_delta(x, out_f, wide, rows), expected)


def test_low_precision_inputs_compute_in_fp32():
    pattern = random_pattern((16, 8), 20, False, 0)
    adapter = _adapter(pattern, torch.randn(20))
    tables = IndexTables.build([adapter], torch.device("cpu"))
    rows = torch.tensor([0, 1])  # one row with the adapter, one without
    x = torch.randn(2, 3, 8)
    y32 = gathered_delta(x, 16, tables, rows)
    yb = gathered_delta(x.bfloat16(), 16, tables, rows)
    assert y32.dtype == yb.dtype == torch.float32  # the caller rounds once, to the layer's dtype
    torch.testing.assert_close(yb, y32, atol=0.05, rtol=0.02)
    assert torch.equal(y32[1], torch.zeros_like(y32[1]))  # the row without an adapter gets no delta


def test_a_layer_keeps_its_tables_across_batches_until_its_adapters_change():
    layer, cpu = torch.nn.Linear(8, 16), torch.device("cpu")
    adapters = {"a": _adapter(random_pattern((16, 8), 20, False, 0), torch.randn(20))}
    tables = layer_tables(layer, adapters, ["a"], cpu)
    again = layer_tables(layer, adapters, ["a"], cpu)  # a new batch over the same adapters: no rebuild
    assert again.out_index is tables.out_index and again.members[0] is adapters["a"]
    assert layer_tables(torch.nn.Linear(8, 16), adapters, ["a"], cpu).out_index is not tables.out_index  # per layer
    adapters["b"] = _adapter(random_pattern((16, 8), 30, False, 1), torch.randn(30))
    grown = layer_tables(layer, adapters, ["a", "b"], cpu)  # an adapter added: a slot more, N = 30
    assert grown.out_index.shape == (3, 30) and grown.in_index.dtype == torch.int16  # kept per layer
    adapters["a"] = _adapter(random_pattern((16, 8), 20, False, 2), torch.randn(20))  # replaced under its name
    replaced = layer_tables(layer, adapters, ["a", "b"], cpu)
    assert not torch.equal(replaced.in_index[0], grown.in_index[0])
    x, rows = torch.randn(2, 1, 8), torch.tensor([0, 2])  # a row of "a" and one without an adapter
    first = gathered_delta(x, 16, replaced, rows)
    adapters["a"].values.mul_(2)  # an in-place edit (a training step) is seen by the next call, tables kept
    assert layer_tables(layer, adapters, ["a", "b"], cpu).out_index is replaced.out_index
    torch.testing.assert_close(gathered_delta(x, 16, replaced, rows), 2 * first)
    assert torch.equal(first[1], torch.zeros_like(first[1]))


def test_the_layer_cache_does_not_keep_a_deleted_adapter_alive():
    """PEFT's delete_adapter frees an adapter: the tables a layer keeps must not hold it until its next batch."""
    layer = torch.nn.Linear(8, 16)
    adapters = {"a": _adapter(random_pattern((16, 8), 20, False, 0), torch.randn(20))}
    layer_tables(layer, adapters, ["a"], torch.device("cpu"))
    deleted = weakref.ref(adapters.pop("a"))
    gc.collect()
    assert deleted() is None


def test_without_gradients_the_stacked_values_are_reused_until_any_member_changes():
    """generate's decode steps reuse one stack of the values; an edit of any kind must still be seen at once."""
    layer, cpu = torch.nn.Linear(8, 16), torch.device("cpu")
    adapters = {k: _adapter(random_pattern((16, 8), n, False, i), torch.randn(n))
                for i, (k, n) in enumerate([("a", 20), ("b", 30)])}
    x, rows = torch.randn(3, 2, 8), torch.tensor([0, 1, 2])  # a row of "a", one of "b", one without an adapter

    def delta():
        return gathered_delta(x, 16, layer_tables(layer, adapters, ["a", "b"], cpu), rows)

    def expected():
        dense = {k: dense_delta(a.values.detach(), a.pattern()).float() for k, a in adapters.items()}  # (out, in)
        return torch.stack([x[0] @ dense["a"].t(), x[1] @ dense["b"].t(),
                            torch.zeros(2, 16)])

    with torch.no_grad():
        tables = layer_tables(layer, adapters, ["a", "b"], cpu)
        assert tables.values(torch.float32) is layer_tables(layer, adapters, ["a", "b"], cpu).values(torch.float32)
        assert tables.values(torch.float64).dtype == torch.float64  # another dtype: its own stack
        torch.testing.assert_close(delta(), expected())
        adapters["b"].values.mul_(3)  # in place (an optimizer step, load_state_dict): a new version
        torch.testing.assert_close(delta(), expected())
        adapters["a"].values.data = torch.randn(20)  # new storage, same tensor object and version
        torch.testing.assert_close(delta(), expected())
        adapters["b"].values = torch.randn(30)  # another tensor
        torch.testing.assert_close(delta(), expected())
    with torch.inference_mode():
        torch.testing.assert_close(delta(), expected())
    values = adapters["a"].values.requires_grad_()  # with gradients: stacked per call, so they reach the values
    x.requires_grad_(False)
    (grad,) = torch.autograd.grad(delta()[0].sum(), [values])
    assert grad.abs().sum() > 0
