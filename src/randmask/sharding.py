"""DTensor (FSDP2 / tensor-parallel) helpers the layers share: detect a sharded tensor, gather it, and write a
layer's O(nnz) entries into this rank's shard only. Imports torch.distributed only when a tensor is sharded."""

from __future__ import annotations

import sys

import torch


def is_sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is a DTensor (FSDP2 / tensor parallel). Never imports torch.distributed itself."""
    module = sys.modules.get("torch.distributed.tensor")
    cls = getattr(module, "DTensor", None) if module is not None else None
    return cls is not None and isinstance(t, cls)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or the whole of a DTensor (a collective: every rank of its mesh must call it)."""
    return t.full_tensor() if is_sharded(t) else t


def write_entries(weight: torch.Tensor, indices: torch.Tensor, entries: torch.Tensor) -> None:
    """``weight.view(-1)[indices] = entries`` in place; a DTensor weight writes only this rank's block, O(nnz)."""
    with torch.no_grad():
        if not is_sharded(weight):
            weight.view(-1)[indices] = entries.to(weight.dtype)
            return
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        (n_rows, n_cols), (r0, c0) = compute_local_shape_and_global_offset(weight.shape, weight.device_mesh,
                                                                           weight.placements)
        local = weight.to_local()
        cols = weight.shape[1]
        rows, cs = torch.div(indices, cols, rounding_mode="floor"), indices % cols
        mine = (rows >= r0) & (rows < r0 + n_rows) & (cs >= c0) & (cs < c0 + n_cols)
        # view, not reshape: a copy would take the write and leave the shard as it was.
        local.view(-1)[(rows[mine] - r0) * n_cols + (cs[mine] - c0)] = entries.to(local.device)[mine].to(local.dtype)


__all__ = ["full_tensor", "is_sharded", "write_entries"]
