"""randmask as a registered PEFT method: ``get_peft_model(model, RandMaskConfig(...))``.

Importing this module imports ``peft`` (``import randmask`` never does) and registers the
method under the PEFT type ``"RANDMASK"``. Then the whole PEFT surface works:
``save_pretrained`` / ``PeftModel.from_pretrained`` (after ``import randmask.peft``),
``merge_and_unload``, ``disable_adapter``, named adapters, HF ``Trainer`` and TRL.

How it registers: ``randmask.peft_registry`` (needs peft >= 0.21, no upper bound).

The tuner layer keeps randmask's design: the trained entries live inside the frozen weight,
the weight gradient is the sparse SDDMM of ``randmask.ops``, and the file holds only the
values (in the weight's dtype: ~2 bytes/entry for a bf16 base); masks are regenerated from
(seed, module name) and checked against checksums and base fingerprints stored in the config.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any, Literal

import torch
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from randmask.config import MaskingError
from randmask.paths import uses_delta_path
from randmask.peft_config import RandMaskConfig
from randmask.peft_files import check_weights_file
from randmask.peft_layer import RandMaskLayer
from randmask.peft_masks import plan_masks
from randmask.peft_registry import PEFT_TYPE, PREFIX, register
from randmask.peft_serving import peft_add_weighted_adapter, peft_mixed_batch
from randmask.quantized import disable_bnb_cpu_repacking
from randmask.shira import export_shira, import_shira
from randmask.targets import excluded_names
from randmask.unwrap import merge_refusal

try:  # how PEFT's inject_adapter tells an excluded module from an unmatched one (private; absent: it warns, no more)
    from peft.tuners.tuners_utils import _ExcludedModule as _PeftExcluded
except ImportError:  # pragma: no cover
    _PeftExcluded = None


class RandMaskModel(BaseTuner):
    """The PEFT tuner: resolves targets with randmask's resolver and draws every mask up front."""

    prefix: str = PREFIX
    tuner_layer_cls = RandMaskLayer
    target_module_mapping: dict = {}

    def _prepare_adapter_config(self, peft_config: PeftConfig, model_config: dict) -> PeftConfig:
        return peft_config  # target_modules=None: randmask's per-architecture default, resolved below

    def inject_adapter(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True,
                       low_cpu_mem_usage: bool = False, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        if low_cpu_mem_usage or _parameters_land_on_meta():  # get_peft_model enters init_empty_weights for it
            raise MaskingError("low_cpu_mem_usage=True is not supported by randmask: its adapter is one float per "
                               "kept entry, built beside the base weights; drop the option.")
        config = self.peft_config[adapter_name]
        if config.checksums is None:  # a new adapter: record into a copy, so the user's config stays reusable
            config = self.peft_config[adapter_name] = copy.deepcopy(config)
        disable_bnb_cpu_repacking(model)  # before W0 is read; gradients pass through every frozen 4-bit layer
        self._plan = plan_masks(model, config)
        self._excluded = excluded_names(model, config.exclude_modules) if config.exclude_modules else set()
        load = getattr(config, "_randmask_load", None)
        if load is not None:  # from_pretrained: check the weights file before peft reads it
            check_weights_file(model, config, self._plan, load)
        try:
            super().inject_adapter(model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                                   low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)
        finally:
            self._plan, self._excluded = {}, set()

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """PeftModel.forward/generate call this: ``adapter_names=[...]`` runs a mixed batch (one adapter per sample)."""
        with peft_mixed_batch(self, kwargs):
            yield

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: Literal["linear", "ties", "dare_linear", "dare_ties",
                                                       "magnitude_prune"] = "linear",
                             svd_rank: int | None = None, svd_clamp: int | None = None,
                             svd_full_matrices: bool = True, svd_driver: str | None = None,
                             density: float | None = None,
                             majority_sign_method: Literal["total", "frequency"] = "total", seed: int = 0) -> None:
        """Add ``adapter_name``, the merge of ``adapters`` (LoRA's signature, randmask.merge's sparse methods).

        The new adapter's mask per matrix is the union of the merged masks; ``density`` is the share
        of each adapter's entries that ties / dare_* keep; ``seed`` seeds DARE's drops. It lives in
        memory (forward, ``set_adapter``, ``adapter_names``, ``merge_and_unload``); saving it is refused.
        The svd_* options belong to LoRA's SVD merges and are refused.
        """
        peft_add_weighted_adapter(self, adapters, weights, adapter_name, combination_type, density,
                                  majority_sign_method, seed,
                                  {"svd_rank": svd_rank, "svd_clamp": svd_clamp, "svd_driver": svd_driver,
                                   "svd_full_matrices": svd_full_matrices})

    def _check_target_module_exists(self, peft_config: PeftConfig, key: str) -> bool | object:
        if key in getattr(self, "_excluded", ()) and _PeftExcluded is not None:
            return _PeftExcluded()  # counted as excluded: else PEFT warns that exclude_modules excluded nothing
        return key in getattr(self, "_plan", {})

    def _create_and_replace(self, config: RandMaskConfig, adapter_name: str, target: nn.Module, target_name: str,
                            parent: nn.Module, current_key: str, **kwargs: Any) -> None:
        indices, blocks = self._plan[current_key]
        if isinstance(target, RandMaskLayer):
            target.update_layer(adapter_name, indices, blocks, config.mask_kind, config.inference_mode)
            return
        layer = RandMaskLayer(target, adapter_name)
        layer.update_layer(adapter_name, indices, blocks, config.mask_kind, config.inference_mode)
        if adapter_name not in self.active_adapters:
            layer.requires_grad_(False)  # an added adapter is not trainable until set_adapter
        self._replace_module(parent, target_name, layer, target)

    def _check_mergeable(self) -> None:
        """Refuse a merge into any quantized or tied layer before any layer is merged (see randmask.merge_refusal)."""
        for name, module in self.model.named_modules():
            if isinstance(module, RandMaskLayer) and uses_delta_path(module.get_base_layer()):
                raise MaskingError(merge_refusal(name, module.get_base_layer()))

    def _check_adapter_names(self, adapter_names: Any) -> None:
        """``adapter_names`` to merge must be a list of this model's adapters: PEFT skips unknown names per layer, so
        a typo merged nothing (and ``merge_and_unload`` then dropped every adapter)."""
        if adapter_names is None:
            return
        if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)):
            raise MaskingError(f"adapter_names={adapter_names!r}: pass a list of adapter names, e.g. "
                               f"adapter_names=[{adapter_names!r}].")
        unknown = [name for name in adapter_names if name not in self.peft_config]
        if unknown:
            raise MaskingError(f"adapter_names: {unknown} are not adapters of this model; it has "
                               f"{sorted(self.peft_config)}.")

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:  # noqa: D102
        self._check_adapter_names(adapter_names)
        self._check_mergeable()
        super().merge_adapter(adapter_names, safe_merge=safe_merge)

    def _unload_and_optionally_merge(self, merge: bool = True, progressbar: bool = False, safe_merge: bool = False,
                                     adapter_names: list[str] | None = None) -> nn.Module:
        if merge:
            self._check_adapter_names(adapter_names)
            self._check_mergeable()
        if not merge:  # unload(): hand back the pristine base weights
            for module in self.model.modules():
                if isinstance(module, RandMaskLayer):
                    module.restore_base()
        return super()._unload_and_optionally_merge(merge, progressbar=progressbar, safe_merge=safe_merge,
                                                    adapter_names=adapter_names)

    @classmethod
    def _get_adapter_state_dict(cls, model: nn.Module, config: PeftConfig, adapter_name: str,
                                state_dict: dict[str, torch.Tensor], unwanted_adapter_names: list[str]
                                ) -> dict[str, torch.Tensor]:
        if getattr(config, "merged_from", None):
            raise MaskingError(f"adapter {adapter_name!r} is a merge of {config.merged_from} made by "
                               "add_weighted_adapter; its union mask is not regenerable from a seed, so the PEFT "
                               "path does not save it. Leave it out (save_pretrained(selected_adapters=[...])), "
                               "save the sources, or merge with randmask.add_weighted_adapter and save_adapter (which "
                               "stores the indices), or merge_and_unload() into a plain model.")
        out = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        # Save values in a half base's dtype (~2 bytes/entry): the weight holds W0 (+) values.to(half),
        # so this reproduces it bit for bit; fp32/fp64 bases keep their values' own dtype.
        for name, module in model.named_modules():
            if isinstance(module, RandMaskLayer):
                dtype = module.get_base_layer().weight.dtype
                key = f"{name}.randmask_adapters.{adapter_name}.values"
                # The delta path (quantized base) computes with the fp32 values: those are saved whole.
                half = dtype in (torch.float16, torch.bfloat16)
                if key in out and half and not uses_delta_path(module.get_base_layer()):
                    out[key] = out[key].to(dtype)
        return out


    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model: nn.Module, config: PeftConfig, adapter_name: str,
                                           state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        # Every masked layer needs its values, of its length, finite; anything else is a damaged or
        # partial file (PEFT alone would warn about missing keys and load the rest).
        expected = {}
        for name, module in model.named_modules():
            if isinstance(module, RandMaskLayer) and adapter_name in module.randmask_adapters:
                expected[f"{name}.randmask_adapters.{adapter_name}.values"] = module.randmask_adapters[adapter_name].nnz
        found = {k for k in out if ".randmask_adapters." in k}
        if found != set(expected):
            raise MaskingError(f"the adapter weights hold {sorted(found ^ set(expected))[:3]}, which do not match the "
                               "masked modules of this config; the files are partial or from different saves.")
        saved = {f"{name}.modules_to_save.{adapter_name}.{p}" for name, m in model.named_modules()
                 if isinstance(getattr(m, "modules_to_save", None), nn.ModuleDict) and adapter_name in m.modules_to_save
                 for p, _ in m.modules_to_save[adapter_name].named_parameters()}
        unexpected = sorted(set(out) - set(expected) - saved)
        if unexpected:  # e.g. a tensor named like a base weight: loading it would overwrite that weight
            raise MaskingError(f"the adapter weights hold {unexpected[:3]}, which are neither randmask values nor "
                               "modules_to_save parameters of this config; refusing to load them over the base model. "
                               "Re-save the adapter with save_pretrained.")
        for key, nnz in expected.items():
            values = out[key]
            if not values.is_floating_point() or values.shape != (nnz,) or not torch.isfinite(values).all():
                raise MaskingError(f"{key}: expected {nnz} finite floats, got {values.dtype} of shape "
                                   f"{tuple(values.shape)}; the adapter file is corrupt. Re-save it.")
        return out


def _parameters_land_on_meta() -> bool:
    """Whether a parameter registered now is made on the meta device (accelerate's ``init_empty_weights``, which
    ``get_peft_model(..., low_cpu_mem_usage=True)`` enters around the tuner instead of passing the option on)."""
    probe = nn.Module()
    probe.register_parameter("probe", nn.Parameter(torch.empty(0)))
    return probe.probe.is_meta


register(RandMaskConfig, RandMaskModel)

__all__ = ["PEFT_TYPE", "RandMaskConfig", "RandMaskLayer", "RandMaskModel", "export_shira", "import_shira"]
