"""The masked layer: wraps an ``nn.Linear`` / transformers ``Conv1D`` and trains kept entries.

Two ways to apply the active adapter's delta, picked per call (``uses_delta_path``):

- in place, for float weights: at every forward, in O(nnz), the wrapped weight is made to hold
  ``W0 (+) values`` at the kept entries ((+) is addition in the weight's dtype). So an optimizer
  step (or ``load_state_dict``, or any in-place edit of ``values``) is reflected in the weight by
  the next forward with no call from the user, and the forward itself is the unmodified dense layer.
- the delta path, for weights that cannot hold the entries (bitsandbytes / torchao quantized; parametrized, as by
  ``weight_norm``, recomputed at every access) or must not (tied: the same weight is another module's, e.g. the
  input embedding under ``tie_word_embeddings``, which a write would change too):
  ``y = base(x) + sparse_delta(x, values, pattern)``; the stored weight is never written.

During a mixed batch (``row_groups`` set, see ``randmask.mixed``) the weight holds W0 everywhere
instead and each sample group's delta is added on the delta path, whichever path the layer uses.

Sharded weights (FSDP2's ``fully_shard``), in-place path: inside a forward the layer sees the all-gathered
weight and writes the delta there; FSDP frees that copy after the forward and gathers it again from the
shards for the backward, so the op is handed the entries to write again (``refresh``). Outside a forward
the weight is a DTensor and writes touch this rank's shard only (``write_entries``).
"""

from __future__ import annotations

import torch
from torch import nn

from randmask.adapter import Block, MaskAdapter, as_dtype
from randmask.config import MaskingError
from randmask.layer_state import MaskIdentityState, layer_identity
from randmask.mixed import RowGroups, mixed_forward
from randmask.paths import check_weight_assignment, func_transform_active, uses_delta_path
from randmask.quantized import base_entries, stored_shape
from randmask.sharding import is_sharded, write_entries


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): weight stored as (in, out), y = x @ W + b."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def is_maskable(module: nn.Module) -> bool:
    """Whether randmask can mask this module's weight."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def logical_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a Linear or Conv1D (quantized ones too)."""
    out_f, in_f = stored_shape(module)
    return (in_f, out_f) if is_conv1d(module) else (out_f, in_f)


class MaskedLayer(MaskIdentityState, nn.Module):
    """A Linear/Conv1D whose weight carries the active adapter's trained entries in place, or, over a
    quantized weight, adds them beside it (the delta path)."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False
        self.row_groups: RowGroups | None = None  # set during a mixed batch: the delta path, W = W0

    def __setattr__(self, name: str, value: object) -> None:
        if not check_weight_assignment(self, name, value):
            super().__setattr__(name, value)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def transposed(self) -> bool:
        return is_conv1d(self.base_layer)

    @property
    def delta_path(self) -> bool:
        """True when the delta is added beside a quantized, tied or parametrized weight instead of written into it."""
        return uses_delta_path(self.base_layer)

    def add_adapter(self, name: str, indices: torch.Tensor, blocks: list[Block], kind: str,
                    explicit_indices: bool = False) -> MaskAdapter:
        """Add an adapter with these flat stored-weight indices and make it active."""
        if self.weight.is_meta:
            raise MaskingError("the weights are on the meta device (no values yet): randmask keeps W0 at the kept "
                               "entries when it adds an adapter. Load the weights first (to_empty + load_state_dict), "
                               "then apply masking; with FSDP2, apply masking before fully_shard.")
        self.restore_base()  # so base_values captures pristine W0 even where masks overlap
        adapter = MaskAdapter(indices, base_entries(self.base_layer, indices), stored_shape(self.base_layer),
                              self.transposed, blocks, kind, explicit_indices,
                              weight=None if self.delta_path else self.weight)
        if self.active_adapter is not None:
            self.adapters[self.active_adapter].release_base()
        if self.delta_path:  # never written into the weight: nothing to restore
            adapter.release_base()
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
        if self.delta_path:  # nothing to write
            self.active_adapter = name
            return
        if is_sharded(self.weight):  # a shard to write through
            self.restore_base()
            self._hand_over(name)
            self.sync()
            return
        flat = self.base_layer.weight.detach().view(-1)
        if self.active_adapter is not None:
            old = self.adapters[self.active_adapter]
            flat.scatter_(0, as_dtype(old.indices, torch.int64), as_dtype(old.held_base(), flat.dtype))
            old.release_base()
        self.active_adapter = name
        if name is None:
            return
        new = self.adapters[name]
        if new.base_values is None:  # the weight is W0 at every entry now: read the new adapter's (one gather)
            new.hold_base(flat.index_select(0, new.indices))
        if self.disabled or self.row_groups is not None:
            return
        # Known stale: written without a comparison.
        flat.scatter_(0, as_dtype(new.indices, torch.int64), new.target_entries(flat.dtype))

    def _hand_over(self, name: str | None) -> None:
        """Make ``name`` active on a weight that holds W0 at every adapter's entries: only it holds its W0."""
        if self.active_adapter is not None:
            self.adapters[self.active_adapter].release_base()
        self.active_adapter = name
        if name is not None:
            self.adapters[name].capture_base(self.base_layer)

    def restore_base(self) -> None:
        """Write W0 back at the active adapter's entries (the weight becomes pristine)."""
        if self.active_adapter is None or self.delta_path:  # the delta path never writes the weight
            return
        adapter = self.adapters[self.active_adapter]
        adapter.write(self.weight, as_dtype(adapter.held_base(), self.weight.dtype))

    def pristine_entries(self, indices: torch.Tensor) -> torch.Tensor:
        """W0 at ``indices`` (flat stored-weight positions; dequantized on a quantized base): the active adapter's
        delta is taken out of the weight for the read and written back after (O(nnz))."""
        self.restore_base()
        entries = base_entries(self.base_layer, indices)
        self.sync()
        return entries

    def sync(self) -> None:
        """Make the weight hold W0 (+) values at the active adapter's entries (O(nnz)). A sharded (DTensor)
        weight, outside a forward: this rank's shard only, and every rank must call it (values are gathered).

        A no-op during a mixed batch, whose weights must stay W0, and on the delta path.
        """
        if self.live_adapter() is None:
            return
        adapter = self.adapters[self.active_adapter]
        weight = self.weight
        if is_sharded(weight):
            write_entries(weight, adapter.indices, adapter.target_entries(weight.dtype))
            return
        with torch.no_grad():
            target = adapter.target_entries(weight.dtype)
            # Only write when stale: a write bumps the weight's version counter, which would invalidate graphs
            # that saved it (e.g. a second forward before backward). Values edited in place since the last sync
            # (an optimizer step) make the weight stale for certain: write without the gather-and-compare, O(nnz)
            # random reads, about half of a sync. An unchanged version proves nothing (a write through ``.data``
            # does not bump it), so then the entries are compared as before: the shortcut only ever writes.
            if torch.compiler.is_compiling():
                adapter.write(weight, target)
                return
            # Values made under inference_mode have no version counter: compare the entries every time.
            version = -2 if adapter.values.is_inference() else adapter.values._version
            if version != adapter.synced_version or not torch.equal(weight.view(-1)[adapter.indices], target):
                adapter.write(weight, target)
            adapter.synced_version = version

    def live_adapter(self) -> str | None:
        """The adapter whose delta the weight holds (its W0 held beside it), or None: the weight holds W0 at every
        entry (no adapter active, disabled, a mixed batch) or is never written (the delta path)."""
        if self.active_adapter is None or self.disabled or self.row_groups is not None or self.delta_path:
            return None
        return self.active_adapter

    def mask_identity(self) -> dict:
        """What the state dict carries of this layer's masks (``randmask.layer_state``)."""
        return layer_identity(self.adapters, self.live_adapter())

    def held_adapter(self) -> MaskAdapter | None:
        """The adapter whose W0 the layer holds beside the weight: the active one, unless on the delta path."""
        return None if self.active_adapter is None or self.delta_path else self.adapters[self.active_adapter]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.row_groups is not None:  # mixed batch: randmask.mixed_batch restored W0 on entry
            return mixed_forward(self.base_layer, x, self.adapters, self.row_groups)
        if self.active_adapter is None or self.disabled:
            return self.base_layer(x)
        adapter = self.adapters[self.active_adapter]
        if self.delta_path:
            # The quantized layer's own output (its kernel, its dx) plus the sparse delta's: an SpMM over
            # the kept entries forward, SDDMM for dvalues and D^T for dx backward (randmask.delta).
            return adapter.add_delta(self.base_layer(x), x)
        # Not written: FSDP2's gathered weight under torch.compile (traced), or any weight under a torch.func transform
        # (it refuses the write).
        if (torch.compiler.is_compiling() and adapter.weight_replaced()) or func_transform_active():
            return adapter.linear_beside(x, self.weight, self.bias)
        self.sync()
        return adapter.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"active_adapter={self.active_adapter!r}, disabled={self.disabled}"


__all__ = ["MaskedLayer", "is_conv1d", "is_maskable", "logical_shape"]
