"""The masks of a PEFT RandMask adapter: drawn as ``apply_masking`` draws them, then recorded or checked.

At injection the config records each module's mask checksum and base fingerprint; on load they must match, so an
adapter from another base, another sampler version or an edited config is refused before any value is read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from randmask.adapter import Block
from randmask.config import MaskingError
from randmask.drawing import block_densities, draw_mask
from randmask.integrity import base_fingerprint, check_base
from randmask.masks import MASK_KIND_VERSIONS, indices_checksum
from randmask.model import tied_targets
from randmask.paths import mark_shared_weight
from randmask.peft_files import VERIFY_OPT_OUT
from randmask.peft_layer import RandMaskLayer
from randmask.quantized import base_entries, check_weight, quant_scheme
from randmask.summary import count_base_parameters
from randmask.targets import resolve_targets

if TYPE_CHECKING:  # peft.py imports this module: the name is for the annotation only
    from randmask.peft_config import RandMaskConfig


def plan_masks(model: nn.Module, config: RandMaskConfig) -> dict[str, tuple[torch.Tensor, list[Block]]]:
    """Every target's mask for ``config``, drawn as ``apply_masking`` draws it; records
    the masks' checksums and base fingerprints in the config at injection, checks them on load."""
    masking = config.masking_config()
    targets = resolve_targets(model, config.target_modules, config.exclude_modules)
    total = count_base_parameters(model)
    if config.total_params is None:
        config.total_params = total
    elif config.total_params != total:
        raise MaskingError(f"this RandMask adapter was made for a base model with {config.total_params:,} "
                           f"parameters; this one has {total:,}. Load it onto the base it was trained from.")
    record = config.checksums is None
    version = MASK_KIND_VERSIONS.get(config.mask_kind, 1)
    if record:
        config.mask_kind_version = version
    elif (config.mask_kind_version or 1) != version:
        raise MaskingError(f"this RandMask adapter's {config.mask_kind!r} masks were drawn by sampler version "
                           f"{config.mask_kind_version or 1}; this randmask draws version {version}, so they cannot be "
                           "regenerated. Load it with the randmask that saved it, or train it again.")
    verify_base = getattr(config, "_randmask_load", {}).get("verify_base", True)
    checksums = {} if record else config.checksums
    ties = tied_targets(model, targets)
    plan = {}
    for target, densities in zip(targets, block_densities(masking, config.total_params, targets)):
        check_weight(target.name, target.module)
        if not isinstance(model.get_submodule(target.name), RandMaskLayer):  # decided once, before its first adapter
            mark_shared_weight(target.module, ties.get(target.name, ()))
        indices, blocks = draw_mask(target, densities, masking)
        entries = _pristine(model, target.name, target.module, indices)
        if record:
            checksums[target.name] = [indices_checksum(indices), base_fingerprint(entries)]
        else:
            saved = checksums.get(target.name)
            if not (isinstance(saved, list) and len(saved) == 2 and isinstance(saved[1], dict)):
                raise MaskingError(f"{target.name}: the RandMask config has no checksum for this module; it was "
                                   "saved for other target modules or edited. Re-save the adapter.")
            if indices_checksum(indices) != saved[0]:
                raise MaskingError(f"{target.name}: the regenerated mask does not match the saved checksum; the "
                                   "adapter belongs to another base model or its config was edited.")
            if verify_base:
                check_base(target.name, entries, saved[1], scheme=quant_scheme(target.module),
                           opt_out=VERIFY_OPT_OUT)
        plan[target.name] = (indices, blocks)
    if not record and set(checksums) != set(plan):
        raise MaskingError(f"the RandMask config lists modules {sorted(set(checksums) ^ set(plan))[:4]} that "
                           "its targets do not resolve to on this model; re-save the adapter.")
    config.checksums = checksums
    return plan


def _pristine(model: nn.Module, name: str, module: nn.Module, indices: torch.Tensor) -> torch.Tensor:
    """W0 at ``indices`` (a layer that already holds another adapter's delta takes it out first)."""
    layer = model.get_submodule(name)
    if not isinstance(layer, RandMaskLayer):
        return base_entries(module, indices)
    try:
        return layer.pristine_entries(indices)
    except MaskingError as e:
        raise MaskingError(f"{name}: {e}") from None


__all__ = ["plan_masks"]
