"""The grouped custom ops a compiled mixed batch runs above the gathered limit, against the fp64 dense reference."""

import pytest
import torch
from tests.randmask.sparse_patterns import dense_delta, random_pattern

from randmask.compiled_mixed import compiled_grouped_delta, grouped_delta_matmul_op, grouped_sddmm_op

STORED = (8, 6)


def _slots(transposed: bool):
    """Three slots of one layer: 10 entries, none (an adapter that does not target it), 3 entries."""
    patterns = [random_pattern(STORED, 10, transposed, 0), None, random_pattern(STORED, 3, transposed, 1)]
    gen = torch.Generator().manual_seed(2)
    values = [torch.randn(p.nnz, generator=gen, dtype=torch.float64) if p else torch.zeros(0, dtype=torch.float64)
              for p in patterns]
    indices = [p.indices if p else torch.zeros(0, dtype=torch.long) for p in patterns]
    return patterns, values, indices


ROW_SLOT = torch.tensor([2, 0, 3, 0, 1, 2])  # 3: no adapter; 1: an adapter without entries in this layer


def _reference(dense, patterns, values, features):
    """Each row of ``dense`` (B, T, f) through its slot's delta (D^T, or D when ``features`` is the input side)."""
    rows = []
    for b, slot in enumerate(ROW_SLOT.tolist()):
        p = patterns[slot] if slot < len(patterns) else None
        if p is None:
            rows.append(torch.zeros(dense.shape[1], features, dtype=torch.float64))
            continue
        d = dense_delta(values[slot], p)  # (out, in)
        rows.append(dense[b].double() @ (d.t() if d.shape[0] == features else d))
    return torch.stack(rows)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("transpose", [False, True])
def test_grouped_delta_matmul_is_each_rows_own_adapter_and_passes_opcheck(transposed, transpose):
    patterns, values, indices = _slots(transposed)
    out_f, in_f = patterns[0].logical_shape
    dense = torch.randn(len(ROW_SLOT), 4, out_f if transpose else in_f, dtype=torch.float64)
    out = grouped_delta_matmul_op(dense, ROW_SLOT, values, indices, *STORED, transposed, transpose)
    torch.testing.assert_close(out, _reference(dense, patterns, values, in_f if transpose else out_f), atol=1e-12,
                               rtol=0)
    torch.library.opcheck(grouped_delta_matmul_op, (dense, ROW_SLOT, values, indices, *STORED, transposed, transpose))


@pytest.mark.parametrize("transposed", [False, True])
def test_grouped_sddmm_is_each_slots_gradient_over_its_own_rows_and_passes_opcheck(transposed):
    patterns, values, indices = _slots(transposed)
    out_f, in_f = patterns[0].logical_shape
    g, x = torch.randn(len(ROW_SLOT), 4, out_f, dtype=torch.float64), torch.randn(len(ROW_SLOT), 4, in_f,
                                                                                 dtype=torch.float64)
    grads = grouped_sddmm_op(g, x, ROW_SLOT, indices, *STORED, transposed)
    for slot, (p, grad) in enumerate(zip(patterns, grads)):
        rows = (ROW_SLOT == slot).nonzero().flatten()
        if p is None:
            assert grad.shape == (0,)
            continue
        want = sum((g[b].t() @ x[b] for b in rows.tolist()), torch.zeros(out_f, in_f, dtype=torch.float64))
        want = (want.t() if p.transposed else want).reshape(-1)[p.indices]  # dL/dv = (g^T x) at the kept entries
        torch.testing.assert_close(grad, want, atol=1e-12, rtol=0)
    torch.library.opcheck(grouped_sddmm_op, (g, x, ROW_SLOT, indices, *STORED, transposed))


def test_gradients_reach_every_slots_values_and_the_input():
    patterns, values, indices = _slots(False)
    values = [v.requires_grad_() for v in values]
    x = torch.randn(len(ROW_SLOT), 2, 3, 6, dtype=torch.float64, requires_grad=True)  # (B, ..., in)
    assert torch.autograd.gradcheck(
        lambda x, v0, v2: compiled_grouped_delta(x, ROW_SLOT, [v0, values[1], v2], indices, STORED, False),
        (x, values[0], values[2]))


def test_a_bf16_input_gives_a_bf16_delta_computed_in_fp32():
    patterns, values, indices = _slots(False)
    x = torch.randn(len(ROW_SLOT), 4, 6)
    values = [v.float() for v in values]
    exact = compiled_grouped_delta(x, ROW_SLOT, values, indices, STORED, False)
    low = compiled_grouped_delta(x.bfloat16(), ROW_SLOT, values, indices, STORED, False)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), exact, atol=0.05, rtol=0.02)


@pytest.mark.parametrize("case, message", [
    ("slots", "one slot per row"), ("pairs", "pair up"), ("features", r"must be \(rows, tokens, 6\)"),
    ("range", r"row_slot must be int64 slots in \[0, 3\]")])
def test_operands_that_do_not_fit_get_a_one_line_error(case, message):
    _, values, indices = _slots(False)
    dense, row_slot = torch.randn(len(ROW_SLOT), 4, 6, dtype=torch.float64), ROW_SLOT
    if case == "slots":
        row_slot = ROW_SLOT[:-1]
    elif case == "range":
        row_slot = ROW_SLOT + 1  # a slot past "no adapter"
    elif case == "pairs":
        values = values[:-1]
    else:
        dense = dense[..., :5]
    with pytest.raises(ValueError, match=message):
        grouped_delta_matmul_op(dense, row_slot, values, indices, *STORED, False, False)
