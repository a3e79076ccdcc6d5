"""The PEFT tuner layer of randmask: a Linear/Conv1D whose weight holds the live adapter in place.

Imports peft (``BaseTunerLayer``); used by ``randmask.peft``, never by ``import randmask``.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from randmask.adapter import Block, MaskAdapter
from randmask.config import MaskingError
from randmask.layer import is_conv1d
from randmask.layer_state import MaskIdentityState, layer_identity
from randmask.mixed import RowGroups, mixed_forward
from randmask.paths import check_weight_assignment, func_transform_active, uses_delta_path
from randmask.quantized import base_entries, stored_shape
from randmask.unwrap import merge_refusal


class RandMaskLayer(MaskIdentityState, nn.Module, BaseTunerLayer):
    """A Linear/Conv1D whose weight holds the live adapter's entries in place (PEFT tuner layer).

    ``randmask_adapters[name]`` is a ``randmask.MaskAdapter`` (fp32 master ``values`` at fixed
    ``indices``). At most one adapter is live (written into the weight) at a time; merging
    writes it permanently and records the entries it overwrote, so unmerge is bit-exact.
    Over a quantized weight (bitsandbytes, torchao) the delta is added beside it instead
    (``randmask.delta``), nothing is ever written into it, and merging is refused.
    """

    adapter_layer_names = ("randmask_adapters",)
    other_param_names = ()

    def __init__(self, base_layer: nn.Module, adapter_name: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.randmask_adapters = nn.ModuleDict()
        self._active_adapter = adapter_name
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._live: str | None = None  # adapter whose delta the weight holds (unmerged)
        self._overwritten: dict[str, torch.Tensor] = {}  # merged adapter -> entries before its merge
        self.row_groups: RowGroups | None = None  # set during a mixed batch (adapter_names=[...])

    def __setattr__(self, name: str, value: object) -> None:
        if not check_weight_assignment(self, name, value):
            super().__setattr__(name, value)

    def update_layer(self, adapter_name: str, indices: torch.Tensor, blocks: list[Block], kind: str,
                     inference_mode: bool = False) -> None:
        if self.merged:
            raise MaskingError("cannot add a randmask adapter to a merged layer; call unmerge_adapter() first.")
        self.restore_live()  # so that base_values captures pristine W0
        base = self.get_base_layer()
        self.randmask_adapters[adapter_name] = MaskAdapter(
            indices, base_entries(base, indices), stored_shape(base), is_conv1d(base), blocks, kind, False,
            weight=None if uses_delta_path(base) else base.weight)
        self.randmask_adapters[adapter_name].release_base()  # only the live adapter holds its W0 (_make_live)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def restore_live(self) -> None:
        """Write W0 back at the live adapter's entries (merged adapters stay merged)."""
        if self._live is None:
            return
        adapter, flat = self.randmask_adapters[self._live], self.get_base_layer().weight.data.view(-1)
        flat.scatter_(0, adapter.indices.long(), adapter.held_base().to(flat.dtype))  # scatter_: see MaskAdapter.write
        adapter.release_base()  # the weight holds W0 there again
        self._live = None

    def mask_identity(self) -> dict:
        """What the state dict carries of this layer's masks (``randmask.layer_state``)."""
        return layer_identity(self.randmask_adapters, self._live, self.merged_adapters)

    def held_adapter(self) -> MaskAdapter | None:
        """The adapter whose W0 the layer holds beside the weight: the live one."""
        return None if self._live is None else self.randmask_adapters[self._live]

    def pristine_entries(self, indices: torch.Tensor) -> torch.Tensor:
        """W0 at ``indices`` (flat stored-weight positions; dequantized on a quantized base): the live adapter's delta
        is taken out of the weight (written again at the next forward). Refused while adapters are merged."""
        if self.merged:
            raise MaskingError("this layer has merged adapters; call unmerge_adapter() before adding another.")
        self.restore_live()
        return base_entries(self.get_base_layer(), indices)

    def _make_live(self, name: str) -> MaskAdapter:
        adapter, weight = self.randmask_adapters[name], self.get_base_layer().weight
        if self._live == name and torch.compiler.is_compiling():
            # Traced: write without the data-dependent compare, which would break the graph (as MaskedLayer.sync).
            adapter.write(weight, adapter.target_entries(weight.dtype))
            return adapter
        flat = weight.data.view(-1)
        if self._live != name:  # a switch: W0 back at the old entries, the new ones written (O(nnz))
            self._hold_pristine(adapter, flat)
            flat.scatter_(0, adapter.indices.long(), adapter.target_entries(flat.dtype))
            self._live = name
            return adapter
        target = adapter.target_entries(flat.dtype)
        if not torch.equal(flat[adapter.indices], target):  # write only when stale (see MaskedLayer.sync)
            flat[adapter.indices] = target
        return adapter

    def _hold_pristine(self, adapter: MaskAdapter, flat: torch.Tensor) -> None:
        """W0 back at the live adapter's entries; then the weight (``flat``, a view) is W0 at every entry, so an
        ``adapter`` that holds no W0 of its own reads it there (one gather)."""
        self.restore_live()
        if adapter.base_values is None:
            adapter.hold_base(flat.index_select(0, adapter.indices))

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        """PEFT's switch, plus the hot-swap's writes made now rather than at the next forward."""
        super().set_adapter(adapter_names, inference_mode=inference_mode)
        active = [a for a in self.active_adapters if a in self.randmask_adapters]
        if (len(active) == 1 and not self.merged and not self.disable_adapters and self.row_groups is None
                and not uses_delta_path(self.get_base_layer())):  # a quantized weight is never written
            self._make_live(active[0])

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.row_groups is not None:  # mixed batch: W0 in the weight, each group's delta added
            if self.merged:
                raise MaskingError("adapter_names=[...] needs unmerged adapters: call model.unmerge_adapter() first.")
            self.restore_live()  # O(nnz), and only once: _live is None afterwards
            return mixed_forward(self.base_layer, x, self.randmask_adapters, self.row_groups)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            self.restore_live()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.randmask_adapters]
        if not active:
            self.restore_live()
            return self.base_layer(x, *args, **kwargs)
        if len(active) > 1:
            raise MaskingError(f"randmask applies one adapter per layer at a time; {active} are active. Call "
                               "model.set_adapter(name), or merge one first.")
        base, adapter = self.get_base_layer(), self.randmask_adapters[active[0]]
        if uses_delta_path(base):
            return adapter.add_delta(self.base_layer(x, *args, **kwargs), x)
        if torch.compiler.is_compiling() and adapter.weight_replaced() and self._live == active[0]:
            # FSDP2's gathered weight: traced, not written (MaskAdapter.linear_beside); the live adapter holds W0.
            return adapter.linear_beside(x, base.weight, base.bias)
        if func_transform_active():  # torch.func refuses the write: the delta beside the weight as it is
            if self._live != active[0]:  # restoring another adapter's entries writes plain tensors: allowed
                self._hold_pristine(adapter, base.weight.detach().view(-1))
            return adapter.linear_beside(x, base.weight, base.bias)
        return self._make_live(active[0]).linear(x, base.weight, base.bias)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Write the adapters' deltas into the weight (W (+) values at their entries)."""
        names = [n for n in check_adapters_to_merge(self, adapter_names) if n in self.randmask_adapters]
        if names and uses_delta_path(self.get_base_layer()):
            raise MaskingError(merge_refusal(type(self.get_base_layer()).__name__, self.get_base_layer()))
        self.restore_live()
        flat = self.get_base_layer().weight.data.view(-1)
        for name in names:
            adapter = self.randmask_adapters[name]
            before = flat[adapter.indices].clone()
            # On a pristine weight ``before`` is base_values: the same sum as the live forward, bit for bit.
            after = before + adapter.values.detach().to(flat.dtype)
            if safe_merge and not torch.isfinite(after).all():
                raise MaskingError(f"merging adapter {name!r} gives non-finite weights; the adapter is broken.")
            flat[adapter.indices] = after
            self._overwritten[name] = before
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Put back, in reverse order, the entries each merge overwrote (bit-exact)."""
        if not self.merged_adapters:  # nothing to put back (a quantized weight is never merged into)
            return
        flat = self.get_base_layer().weight.data.view(-1)
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            flat[self.randmask_adapters[name].indices] = self._overwritten.pop(name)

    def restore_base(self) -> None:
        """Make the weight pristine W0 (unmerge everything, take the live delta out)."""
        self.unmerge()
        self.restore_live()

    def delete_adapter(self, adapter_name: str) -> None:
        self.restore_base()
        super().delete_adapter(adapter_name)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The dense delta of one adapter, shaped like the stored weight (for inspection only)."""
        adapter, shape = self.randmask_adapters[adapter_name], stored_shape(self.get_base_layer())
        delta = torch.zeros(shape[0] * shape[1], dtype=adapter.values.dtype, device=adapter.values.device)
        delta[adapter.indices] = adapter.values.detach()
        return delta.view(shape)

    def __repr__(self) -> str:
        return "randmask." + super().__repr__()


__all__ = ["RandMaskLayer"]
