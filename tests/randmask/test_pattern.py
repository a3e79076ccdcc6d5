"""The kept entries (``randmask.pattern``): their checks, shapes and CSR plan."""

from __future__ import annotations

import pytest
import torch
from tests.randmask.sddmm_paths import sddmm_reference

from randmask import sddmm
from randmask.masks import bernoulli_mask, make_generator
from randmask.pattern import SparsePattern, logical_shape


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
    torch.testing.assert_close(sddmm.sddmm_compact(g, x, pattern, torch.float32).double(),
                               sddmm_reference(g, x, pattern), rtol=1e-5, atol=1e-5)


def test_a_pattern_keeps_no_per_entry_tensors_beyond_its_plan():
    """At 1% of every linear layer the per-entry index tensors are the memory overhead: the pattern holds
    its indices and the plan 4 bytes per entry (CSR column), nothing else per entry."""
    shape = (64, 48)
    pattern = SparsePattern(bernoulli_mask(shape, 0.05, make_generator(0, "w")), shape)
    plan = pattern.plan()
    per_entry = [t for t in vars(plan).values() if isinstance(t, torch.Tensor) and t.numel() == pattern.nnz]
    assert [t.dtype for t in per_entry] == [torch.int32]  # the column; Linear keeps row-major order: no order
    assert not any(isinstance(v, torch.Tensor) for k, v in vars(pattern).items() if k != "indices")


def test_a_bool_mask_is_not_taken_for_indices():
    with pytest.raises(TypeError, match="1-D int32/int64"):
        SparsePattern(torch.ones(7, 5, dtype=torch.bool), (7, 5), False)


def test_logical_shape_is_out_by_in_for_both_storages():
    assert logical_shape((8, 3), transposed=False) == (8, 3)  # nn.Linear stores (out, in)
    assert logical_shape((3, 8), transposed=True) == (8, 3)  # GPT-2's Conv1D stores (in, out)
    mask = torch.zeros(3, 8, dtype=torch.bool)
    mask[0, 1] = True
    assert SparsePattern(mask.flatten().nonzero().squeeze(1), (3, 8), transposed=True).logical_shape == (8, 3)
