"""What a masked layer's state dict carries beyond its tensors, and the check ``load_state_dict`` makes with it.

A masked model's ``state_dict`` (what ``torch.save``, transformers' ``save_pretrained`` and the HF Trainer's
checkpoints hold) has the wrapped weight, which holds W0 (+) values at the live adapter's entries, and each adapter's
``values``. It has no indices and no W0: loaded into another masking with the same entry counts (``random_exact`` or
``structured`` at another seed), onto another base checkpoint, or with another adapter written into the weight, the
values would land on other entries, or the delta of one adapter would be taken for W0, and nothing would say so.

So each ``MaskedLayer`` adds a small ``_extra_state`` tensor (``torch.nn.Module.get_extra_state``): its adapters'
index checksums, the adapter whose delta the weight holds, and a fingerprint of the W0 it holds for it. At load the
layer compares them with its own before any tensor is copied, and refuses a mismatch in one line. A state dict saved
before layers wrote this (no such key) loads unchecked, as before.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from randmask.config import MaskingError
from randmask.integrity import base_fingerprint
from randmask.masks import indices_checksum

FORMAT = 1
MAX_BYTES = 1 << 20  # ~200 bytes for one adapter (checksums and fingerprints): far above any real layer's
UNCHECKED = torch.zeros(0, dtype=torch.uint8)  # stands in for the key in a state dict saved before layers wrote it


def layer_identity(adapters: Mapping[str, Any], live: str | None, merged: Sequence[str] = ()) -> dict[str, Any]:
    """The identity of a layer's masks: ``{"format", "adapters": {name: index checksum}, "live": the adapter whose
    delta the weight holds (None: the weight holds W0 at every entry), "w0": W0's fingerprint at its entries,
    "merged": the adapters merged into the weight (PEFT's merge_adapter)}``."""
    # W0's fingerprint in its dtype and each narrower one (integrity.base_fingerprint): a state saved from the bf16
    # copy of a model still matches its fp32 copy, compared in the widest dtype both have.
    w0 = base_fingerprint(adapters[live].held_base()) if live is not None else None
    return {"format": FORMAT, "adapters": {name: indices_checksum(a.indices) for name, a in adapters.items()},
            "live": live, "w0": w0, "merged": sorted(merged)}


class MaskIdentityState:
    """The state-dict hooks of a masked layer (``MaskedLayer``, PEFT's ``RandMaskLayer``), mixed in before
    ``nn.Module``: ``get_extra_state`` writes ``mask_identity()``, and ``_load_from_state_dict`` checks a saved one
    before the layer's tensors are copied."""

    def mask_identity(self) -> dict[str, Any]:
        raise NotImplementedError

    def held_adapter(self) -> Any:
        """The adapter whose W0 at its entries the layer holds beside the weight (``MaskAdapter.held_base``), or
        None."""
        raise NotImplementedError

    def get_extra_state(self) -> torch.Tensor:
        """The masks' identity the state dict carries (``randmask.layer_state``), checked by ``load_state_dict``."""
        return encode(self.mask_identity())

    def set_extra_state(self, state: object) -> None:
        """Checked in ``_load_from_state_dict``, where the layer's name is known; nothing to restore."""

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        where = prefix.rstrip(".") or "layer"
        saved = decode(state_dict.setdefault(f"{prefix}_extra_state", UNCHECKED), where)
        if saved is not None:
            check_identity(saved, self.mask_identity(), where)
            if saved["live"] is None and not saved["merged"]:  # the saved weight holds W0 at every entry
                check_loaded_base(self.held_adapter(), state_dict.get(f"{prefix}base_layer.weight"), where)
        super()._load_from_state_dict(state_dict, prefix, *args)  # type: ignore[misc]


def encode(identity: dict[str, Any]) -> torch.Tensor:
    """The identity as a uint8 tensor of its JSON (a tensor, so that safetensors files hold it too)."""
    return torch.tensor(list(json.dumps(identity, sort_keys=True).encode()), dtype=torch.uint8)


def decode(state: Any, where: str) -> dict[str, Any] | None:
    """The identity a state dict holds (None: none was saved); MaskingError when it is not one randmask wrote."""
    if isinstance(state, torch.Tensor) and state.numel() == 0:
        return None
    bad = f"{where}: the state dict's randmask layer state is corrupt or not randmask's; re-save the checkpoint."
    if not (isinstance(state, torch.Tensor) and state.dtype == torch.uint8 and state.ndim == 1
            and state.numel() <= MAX_BYTES):
        raise MaskingError(bad)
    try:
        identity = json.loads(bytes(state.tolist()).decode())
    except (UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: nesting deeper than json reads
        raise MaskingError(bad) from None
    if not (isinstance(identity, dict) and identity.get("format") == FORMAT
            and isinstance(identity.get("adapters"), dict)
            and all(isinstance(v, str) for v in identity["adapters"].values())
            and (identity.get("live") is None or isinstance(identity.get("live"), str))
            and (identity.get("w0") is None or (isinstance(identity.get("w0"), dict)
                                                and all(isinstance(v, str) for v in identity["w0"].values())))
            and isinstance(identity.setdefault("merged", []), list)
            and all(isinstance(v, str) for v in identity["merged"])):
        raise MaskingError(bad)
    return identity


def check_identity(saved: dict[str, Any], ours: dict[str, Any], where: str) -> None:
    """Refuse a state dict whose masks, written adapter or W0 differ from this layer's (``where``: its name)."""
    for name in sorted(saved["adapters"].keys() & ours["adapters"].keys()):
        if saved["adapters"][name] != ours["adapters"][name]:
            raise MaskingError(f"{where}: the state dict's adapter {name!r} was drawn with another mask (another "
                               "seed, budget, mask kind or targets): its values would land on other entries. Load it "
                               "into the base masked with the config it was saved from.")
    if sorted(saved["merged"]) != ours["merged"]:
        raise MaskingError(f"{where}: the state dict's weight has adapters {sorted(saved['merged'])} merged into it, "
                           f"this layer {ours['merged']}: its weight would be taken for another. Merge or unmerge "
                           "(merge_adapter / unmerge_adapter) to match before loading.")
    if saved["live"] is not None and saved["live"] != ours["live"]:
        here = f"adapter {ours['live']!r} written into it" if ours["live"] else "no adapter written into it"
        raise MaskingError(f"{where}: the state dict's weight holds adapter {saved['live']!r}'s delta, this layer has "
                           f"{here} (another active adapter, or inside disable_adapter / mixed_batch): its delta "
                           f"would be taken for W0. set_adapter({saved['live']!r}) and load outside those contexts.")
    common = set(saved["w0"] or ()) & set(ours["w0"] or ())  # none: fp16 against bf16, which no cast relates
    widest = max(common, key=lambda name: torch.finfo(getattr(torch, name)).bits, default=None)
    if saved["live"] is not None and widest is not None and saved["w0"][widest] != ours["w0"][widest]:
        raise MaskingError(f"{where}: the state dict was saved from another base model (W0 at adapter "
                           f"{saved['live']!r}'s entries differs): the trained entries would sit on this base's W0. "
                           "Load it into the base it was trained from (a model built from its config alone: load the "
                           "base weights first, then apply_masking, then this state dict).")


def check_loaded_base(held: Any, incoming: Any, where: str) -> None:
    """Refuse a saved weight that holds another base's W0 at the entries of ``held`` (the adapter whose W0 this layer
    holds beside its weight), compared in the narrower of the two dtypes: loaded, the weight would be the other
    base's and the held W0 this one's, so the next write (a forward, set_adapter, unload) would mix the two. A saved
    weight that is not a plain tensor of this layer's size (sharded, quantized) is not compared."""
    size = None if held is None else held.stored_shape[0] * held.stored_shape[1]
    if held is None or held.base_values is None or type(incoming) is not torch.Tensor or incoming.numel() != size:
        return
    ours = held.held_base()
    theirs = incoming.detach().reshape(-1)[held.indices.to(incoming.device)]
    if not (ours.is_floating_point() and theirs.is_floating_point()):
        return
    narrow = min((ours.dtype, theirs.dtype), key=lambda dtype: torch.finfo(dtype).bits)
    theirs = theirs.to(device=ours.device, dtype=narrow)
    # W0 (+) values also passes: what this layer's weight holds while the adapter is live, as a state dict taken
    # inside disable_adapter does once the block has ended (its tensors are the parameters themselves)
    if not (torch.equal(theirs, ours.to(narrow)) or torch.equal(theirs, held.target_entries(ours.dtype).to(narrow))):
        raise MaskingError(f"{where}: the state dict was saved from another base model (its weight's W0 differs at "
                           "the active adapter's entries): loaded, the weight would be that base's and the W0 this "
                           "layer holds this one's. Load it into the base it was saved from (a model built from its "
                           "config alone: load the base weights first, then apply_masking, then this state dict).")


__all__ = ["UNCHECKED", "MaskIdentityState", "check_identity", "check_loaded_base", "decode", "encode",
           "layer_identity"]
