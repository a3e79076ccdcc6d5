"""The masked layer: wraps an ``nn.Linear`` / transformers ``Conv1D`` and trains kept entries.

Invariant, checked at every forward in O(nnz): at the active adapter's kept entries
the wrapped weight equals ``W0 (+) values``, where (+) is addition in the weight's
dtype. So an optimizer step (or ``load_state_dict``, or any in-place edit of
``values``) is reflected in the weight by the next forward with no call from the
user, and the forward itself is the unmodified dense layer (the in-place path).

During a mixed batch (``row_groups`` set, see ``randmask.mixed``) the weight holds W0
everywhere instead and each sample group's delta is added on the delta path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from randmask.mixed import RowGroups, mixed_forward
from randmask.ops import SparsePattern, masked_linear


@dataclass(frozen=True)
class Block:
    """A row range [start, stop) of the logical (out, in) matrix masked as one matrix."""

    name: str
    start: int
    stop: int
    nnz: int


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): weight stored as (in, out), y = x @ W + b."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def is_maskable(module: nn.Module) -> bool:
    """Whether randmask can mask this module's weight."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def logical_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a Linear or Conv1D."""
    out_f, in_f = module.weight.shape
    return (in_f, out_f) if is_conv1d(module) else (out_f, in_f)


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype`` (no dispatch when it already is: the hot-swap counts calls)."""
    return t if t.dtype == dtype else t.to(dtype)


class MaskAdapter(nn.Module):
    """One named adapter of a masked layer: trainable ``values`` at fixed ``indices``."""

    def __init__(self, indices: torch.Tensor, weight: torch.Tensor, transposed: bool,
                 blocks: list[Block], kind: str, explicit_indices: bool) -> None:
        super().__init__()
        master_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        # Values are the delta from W0, zero-initialised; fp32 master copy even for half weights,
        # so that updates smaller than a bf16 ulp still accumulate.
        self.values = nn.Parameter(torch.zeros(indices.numel(), dtype=master_dtype, device=weight.device))
        idx = indices.to(weight.device)
        self.register_buffer("indices", idx, persistent=False)
        with torch.no_grad():
            self.register_buffer("base_values", weight.reshape(-1)[idx].clone(), persistent=False)
        self.stored_shape = tuple(weight.shape)
        self.transposed = transposed
        self.blocks = blocks
        self.kind = kind
        self.explicit_indices = explicit_indices  # custom masks: indices are saved in the file
        self._pattern: SparsePattern | None = None

    @property
    def nnz(self) -> int:
        return int(self.indices.numel())

    def pattern(self) -> SparsePattern:
        """The sparse pattern on the indices' current device (cached)."""
        if self._pattern is None or self._pattern.indices.device != self.indices.device:
            self._pattern = SparsePattern(self.indices, self.stored_shape, self.transposed)
        return self._pattern

    def target_entries(self, weight_dtype: torch.dtype) -> torch.Tensor:
        """W0 (+) values in the weight dtype: what the weight holds at the kept entries."""
        return torch.add(_as(self.base_values, weight_dtype), _as(self.values.detach(), weight_dtype))

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> MaskAdapter:
        # model.half() / model.to(torch.bfloat16) must not turn the fp32 master values into half:
        # AdamW's update then underflows (NaN at LR 1e-3 in fp16). Follow device moves and fp64,
        # keep everything else fp32; base_values and the weight do take the new dtype.
        master = self.values.data
        out = super()._apply(fn, recurse)
        if self.values.dtype in (torch.float16, torch.bfloat16):
            self.values.data = master.to(device=self.values.device, dtype=torch.float32)
            if self.values.grad is not None:
                self.values.grad = self.values.grad.float()
        return out

    def extra_repr(self) -> str:
        return f"kind={self.kind}, nnz={self.nnz}, shape={self.stored_shape}"


class MaskedLayer(nn.Module):
    """A Linear/Conv1D whose weight carries the active adapter's trained entries in place."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False
        self.row_groups: RowGroups | None = None  # set during a mixed batch: the delta path, W = W0

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def transposed(self) -> bool:
        return is_conv1d(self.base_layer)

    def add_adapter(self, name: str, indices: torch.Tensor, blocks: list[Block], kind: str,
                    explicit_indices: bool = False) -> MaskAdapter:
        """Add an adapter with these flat stored-weight indices and make it active."""
        self.restore_base()  # so base_values captures pristine W0 even where masks overlap
        adapter = MaskAdapter(indices, self.weight, self.transposed, blocks, kind, explicit_indices)
        self.adapters[name] = adapter
        self.active_adapter = name
        self.sync()
        return adapter

    def set_active(self, name: str | None) -> None:
        """Switch the active adapter (``None``: none): W0 back at the old entries, then the new ones written.

        O(nnz of the two adapters): no dense copy, no reload (the hot-swap). Written for few calls per
        layer: at 1e-3 of a 135M model each matrix holds ~2k entries, where dispatch costs as much as the work.
        """
        if name == self.active_adapter:
            self.sync()
            return
        flat = self.base_layer.weight.detach().view(-1)
        if self.active_adapter is not None:
            old = self.adapters[self.active_adapter]
            flat.scatter_(0, old.indices, _as(old.base_values, flat.dtype))
        self.active_adapter = name
        if name is None or self.disabled or self.row_groups is not None:
            return
        new = self.adapters[name]
        flat.scatter_(0, new.indices, new.target_entries(flat.dtype))  # known stale: no comparison

    def restore_base(self) -> None:
        """Write W0 back at the active adapter's entries (the weight becomes pristine)."""
        if self.active_adapter is None:
            return
        adapter = self.adapters[self.active_adapter]
        self._write(adapter, _as(adapter.base_values, self.weight.dtype))

    def _write(self, adapter: MaskAdapter, entries: torch.Tensor) -> None:
        # scatter_ on a detached flat view: the weight's own storage, outside autograd (the weight is
        # frozen), and its version counter still bumps. scatter_ runs 2-4x faster than index_put_
        # (``w[idx] = v``) at a few thousand entries on CPU.
        self.weight.detach().view(-1).scatter_(0, adapter.indices, entries)

    def sync(self) -> None:
        """Make the weight hold W0 (+) values at the active adapter's entries (O(nnz)).

        A no-op during a mixed batch, whose weights must stay W0.
        """
        if self.active_adapter is None or self.disabled or self.row_groups is not None:
            return
        adapter = self.adapters[self.active_adapter]
        weight = self.weight
        with torch.no_grad():
            target = adapter.target_entries(weight.dtype)
            flat = weight.view(-1)
            # Only write when stale: a write bumps the weight's version counter, which would
            # invalidate graphs that saved it (e.g. a second forward before backward).
            if not torch.equal(flat[adapter.indices], target):
                self._write(adapter, target)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.row_groups is not None:  # mixed batch: randmask.mixed_batch restored W0 on entry
            return mixed_forward(self.base_layer, x, self.adapters, self.row_groups)
        if self.active_adapter is None or self.disabled:
            return self.base_layer(x)
        self.sync()
        adapter = self.adapters[self.active_adapter]
        return masked_linear(x, adapter.values, self.weight, self.bias, adapter.pattern())

    def extra_repr(self) -> str:
        return f"active_adapter={self.active_adapter!r}, disabled={self.disabled}"
