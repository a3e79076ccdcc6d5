"""eigenvector_localization: shares per tensor, the effective number of entries, and where the top entries lie."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import tiny_model  # tests/conftest.py (tests/ is on sys.path under pytest)
from torch import nn

from randmask import MaskingConfig, apply_masking, masked_layers
from randmask_lab.analysis import hessian_top_eigenvalue
from randmask_lab.analysis.localization import eigenvector_localization


class Quadratic(nn.Module):
    """loss = 100 a₁² + Σ b²: the Hessian is diag(0, 200, 0, 2, 2, 2, 2), its top eigenvector e(a₁)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Parameter(torch.ones(3, dtype=torch.float64)), nn.Parameter(torch.ones(2, 2).double())

    def forward(self, _batch: object) -> torch.Tensor:
        return 100 * self.a[1] ** 2 + (self.b ** 2).sum()


def test_the_top_eigenvector_of_a_diagonal_hessian_is_one_entry() -> None:
    model = Quadratic()
    res = hessian_top_eigenvalue(model, [None], lambda m, b: m(b), tol=1e-10, max_iter=200)
    where = eigenvector_localization(model, res.vector)
    assert res.eigenvalue == pytest.approx(200.0)
    assert where["participation"] == pytest.approx(1.0, abs=1e-6) and where["dim"] == 7
    assert where["top_tensors"][0]["param"] == "a" and where["top_tensors"][0]["share"] == pytest.approx(1.0)
    assert where["top_entries"][0] == {"param": "a", "index": 1, "share": pytest.approx(1.0)}


def test_a_flat_vector_spreads_over_every_entry_and_2d_entries_get_row_and_col() -> None:
    model = Quadratic()
    where = eigenvector_localization(model, torch.ones(7), top=7)
    assert where["participation"] == pytest.approx(7.0)
    assert sorted(t["share"] for t in where["top_tensors"]) == pytest.approx([3 / 7, 4 / 7])
    positions = {(e["row"], e["col"]) for e in where["top_entries"] if e["param"] == "b"}
    assert positions == {(0, 0), (0, 1), (1, 0), (1, 1)}


def test_a_masked_entry_is_named_by_its_output_and_input_feature() -> None:
    model = apply_masking(tiny_model("llama"), MaskingConfig(density=0.3, seed=0))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    layer = list(masked_layers(model).values())[1]  # the second masked matrix
    adapter = layer.adapters[layer.active_adapter]
    i = next(i for i, (_, p) in enumerate(named) if p is adapter.values)
    name, offset = named[i][0], sum(p.numel() for _, p in named[:i])
    k = adapter.nnz // 2
    vector = torch.zeros(sum(p.numel() for _, p in named))
    vector[offset + k] = -3.0
    (top, *_) = eigenvector_localization(model, vector)["top_entries"]
    flat = int(adapter.indices[k])
    out_f, in_f = divmod(flat, adapter.stored_shape[1])  # nn.Linear: stored (out, in)
    assert (top["param"], top["index"], top["share"]) == (name, k, 1.0)
    assert (top["out_feature"], top["in_feature"]) == (out_f, in_f)


def test_a_vector_of_the_wrong_size_or_zero_is_refused() -> None:
    model = Quadratic()
    with pytest.raises(ValueError, match="trainable parameters hold 7 entries"):
        eigenvector_localization(model, torch.ones(6))
    with pytest.raises(ValueError, match="no direction"):
        eigenvector_localization(model, torch.zeros(7))
