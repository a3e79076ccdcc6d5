"""randmask as a registered PEFT method: ``get_peft_model(model, RandMaskConfig(...))``.

Importing this module imports ``peft`` (``import randmask`` never does) and registers the
method under the PEFT type ``"RANDMASK"``. Then the whole PEFT surface works:
``save_pretrained`` / ``PeftModel.from_pretrained`` (after ``import randmask.peft``),
``merge_and_unload``, ``disable_adapter``, named adapters, HF ``Trainer`` and TRL.

How it registers (``_register``; needs peft >= 0.21, no upper bound): first through peft's public
``peft.utils.register_peft_method``, for a peft that accepts the name. peft 0.21 refuses names outside
its ``PeftType`` enum, and an external package cannot add enum members cleanly; but ``PeftType`` is a
``str`` enum and every lookup (``PEFT_TYPE_TO_CONFIG_MAPPING[config.peft_type]`` and the tuner and
prefix mappings) is a plain dict keyed by it, so the plain string ``"RANDMASK"`` is a valid key that
round-trips through ``adapter_config.json``. ``_register`` then writes the three mappings after the same
checks ``register_peft_method`` makes, finding them by name: a peft without them is a MaskingError naming
the version that has them. tests/randmask/test_peft.py checks the route against the installed peft.

The tuner layer keeps randmask's design: the trained entries live inside the frozen weight,
the weight gradient is the sparse SDDMM of ``randmask.ops``, and the file holds only the
values (in the weight's dtype: ~2 bytes/entry for a bf16 base); masks are regenerated from
(seed, module name) and checked against checksums and base fingerprints stored in the config.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import peft
import torch
from peft.config import PeftConfig, PeftConfigMixin
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from randmask.config import MaskingConfig, MaskingError
from randmask.drawing import block_densities, draw_mask
from randmask.integrity import base_fingerprint
from randmask.layer import Block
from randmask.masks import BUILTIN_KINDS, MASK_KIND_VERSIONS, indices_checksum
from randmask.model import count_base_parameters, merge_refusal, tied_targets
from randmask.paths import mark_shared_weight, uses_delta_path
from randmask.peft_files import (
    CONFIG_NAME,
    OPT_OUT,
    check_base_named,
    check_sealed,
    check_weights_file,
    guard_peft_type,
    read_config,
    seal,
    weights_file,
)
from randmask.peft_layer import RandMaskLayer
from randmask.peft_serving import peft_add_weighted_adapter, peft_mixed_batch
from randmask.quantized import base_entries, check_weight, disable_bnb_cpu_repacking, quant_scheme
from randmask.shira import export_shira, import_shira
from randmask.targets import resolve_targets
from randmask.warn import warn_caller


class _PeftTypeName(str):
    """A plain ``str`` to every PEFT lookup and in every saved file, which also prints and reads as PEFT's own
    ``PeftType`` members do: ``.value`` (``hotswap_adapter``'s refusal of a non-LoRA method raised AttributeError
    without it) and ``str()`` as ``"PeftType.RANDMASK"`` (``get_model_status`` keeps what follows the dot)."""

    @property
    def value(self) -> str:
        return str.__str__(self)

    def __str__(self) -> str:
        return f"PeftType.{self.value}"


PEFT_TYPE = _PeftTypeName("RANDMASK")
PREFIX = "randmask_"


@dataclass
class RandMaskConfig(PeftConfig):
    """PEFT config of a Random Masking adapter (the fields of ``randmask.MaskingConfig``)."""

    target_modules: list[str] | str | None = field(default=None, metadata={
        "help": "Module-name suffixes (['q_proj', 'v_proj']), a plain name, a regex, or GPT-2's "
                "'c_attn[q,v]'; None: the architecture's attention query/value projections."})
    trainable_ratio: float | None = field(default=None, metadata={
        "help": "Trainable entries as a fraction of ALL model parameters (the paper's budget)."})
    density: float | None = field(default=None, metadata={"help": "Per-matrix keep probability in (0, 1]."})
    mask_kind: str = field(default="random", metadata={"help": "random, random_exact or structured."})
    seed: int = field(default=0, metadata={"help": "Mask seed; each matrix's is derived from (seed, name)."})
    partition: list[int] | None = field(default=None, metadata={
        "help": "[k, n]: part k of n disjoint parts of one draw (adapters that never share an entry)."})
    modules_to_save: list[str] | None = field(default=None, metadata={
        "help": "Modules besides the masked ones to train and save (e.g. a classifier head)."})
    total_params: int | None = field(default=None, metadata={
        "help": "Base-model parameter count, recorded at injection (the budget's denominator)."})
    checksums: dict[str, Any] | None = field(default=None, metadata={
        "help": "Per module: [indices checksum, base fingerprint], recorded at injection, checked at load."})
    merged_from: list[str] | None = field(default=None, metadata={
        "help": "Set by add_weighted_adapter: the adapters this one merges (in memory only; not saved)."})
    mask_kind_version: int | None = field(default=None, metadata={
        "help": "Version of the sampler that drew the masks (randmask.MASK_KIND_VERSIONS), recorded at injection."})
    weights_sha256: str | None = field(default=None, metadata={
        "help": "SHA-256 of adapter_model.safetensors, recorded when the config is saved beside it."})
    config_sha256: str | None = field(default=None, metadata={
        "help": "SHA-256 of this config's randmask fields (randmask.peft_files.SEALED), recorded at save."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if self.mask_kind not in BUILTIN_KINDS:
            raise MaskingError(f"RandMaskConfig(mask_kind={self.mask_kind!r}): the PEFT path regenerates masks "
                               f"from the seed, so use one of {list(BUILTIN_KINDS)}; for custom masks use "
                               "randmask.apply_masking(custom_masks=...) and randmask.save_adapter.")
        if self.total_params is not None and (not isinstance(self.total_params, int) or self.total_params <= 0):
            raise MaskingError(f"RandMaskConfig.total_params={self.total_params!r} must be a positive int (it is "
                               "recorded at injection); the adapter config was edited. Re-save the adapter.")
        if self.checksums is not None and not isinstance(self.checksums, dict):
            raise MaskingError("RandMaskConfig.checksums must be a dict (recorded at injection); re-save the adapter.")
        self.masking_config()

    def masking_config(self) -> MaskingConfig:
        """The equivalent ``randmask.MaskingConfig`` (validated)."""
        return MaskingConfig(targets=self.target_modules, trainable_ratio=self.trainable_ratio,
                             density=self.density, mask_kind=self.mask_kind, seed=self.seed,
                             partition=tuple(self.partition) if self.partition is not None else None)

    def _json_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(self.to_dict(), default=sorted))

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """PEFT's save, sealed: the SHA-256 of the weights file PEFT wrote into the same folder just before, and a
        checksum of the randmask fields."""
        self.weights_sha256 = self.config_sha256 = None
        sealed = seal(self._json_dict(), Path(save_directory))
        self.weights_sha256, self.config_sha256 = sealed["weights_sha256"], sealed["config_sha256"]
        super().save_pretrained(save_directory, **kwargs)

    @classmethod
    def from_json_file(cls, path_json_file: str, **kwargs: Any) -> dict[str, Any]:
        """The config file, read bounded and strict (randmask.files), every randmask field's type checked."""
        data = read_config(path_json_file)
        data.pop("runtime_config", None)  # a runtime-only field, as peft's own reader drops it
        return data

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None,
                        **kwargs: Any) -> RandMaskConfig:
        """PEFT's config loader plus randmask's checks. ``randmask_allow_unverified=True`` loads a config without
        checksums (as randmask before them wrote); ``randmask_verify_base=False`` skips only the base-fingerprint
        check. Both pass through ``PeftModel.from_pretrained(model, path, ...)``."""
        allow = kwargs.pop(OPT_OUT, False)
        verify_base = kwargs.pop("randmask_verify_base", True)
        if not isinstance(allow, bool) or not isinstance(verify_base, bool):
            raise MaskingError(f"{OPT_OUT} and randmask_verify_base must be True or False.")
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        if not isinstance(config, RandMaskConfig):
            raise MaskingError(f"{pretrained_model_name_or_path} is not a RandMask adapter config.")
        where = os.path.join(pretrained_model_name_or_path, subfolder or "", CONFIG_NAME)
        verified = check_sealed(config._json_dict(), where, allow)
        config._randmask_load = {"weights": weights_file(pretrained_model_name_or_path, subfolder, kwargs),
                                 "verified": verified, "verify_base": verify_base}
        return config


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
        self._plan = _plan_masks(model, config)
        load = getattr(config, "_randmask_load", None)
        if load is not None:  # from_pretrained: check the weights file before peft reads it
            check_weights_file(model, config, self._plan, load)
        try:
            super().inject_adapter(model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                                   low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)
        finally:
            self._plan = {}

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

    def _check_target_module_exists(self, peft_config: PeftConfig, key: str) -> bool:
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


def _plan_masks(model: nn.Module, config: RandMaskConfig) -> dict[str, tuple[torch.Tensor, list[Block]]]:
    """Every target's mask, drawn as ``apply_masking`` draws it; records or checks the checksums."""
    masking = config.masking_config()
    targets = resolve_targets(model, config.target_modules)
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
                _check_base(target, entries, saved[1])
        plan[target.name] = (indices, blocks)
    if not record and set(checksums) != set(plan):
        raise MaskingError(f"the RandMask config lists modules {sorted(set(checksums) ^ set(plan))[:4]} that "
                           "its targets do not resolve to on this model; re-save the adapter.")
    config.checksums = checksums
    return plan


def _pristine(model: nn.Module, name: str, module: nn.Module, indices: torch.Tensor) -> torch.Tensor:
    """W0 at ``indices`` (a layer that already holds another adapter's delta is asked to undo it first)."""
    layer = model.get_submodule(name)
    if isinstance(layer, RandMaskLayer):
        if layer.merged:
            raise MaskingError(f"{name} has merged adapters; call unmerge_adapter() before adding another.")
        layer.restore_live()
    return base_entries(module, indices)


def _check_base(target: Any, entries: torch.Tensor, saved: dict) -> None:
    """The base-fingerprint check of PEFT's loader; on a quantized base the error says why it cannot match."""
    try:
        check_base_named(target.name, entries, saved)
    except MaskingError as e:
        scheme = quant_scheme(target.module)
        if scheme is None:
            raise
        raise MaskingError(f"{e} This base is quantized ({scheme}): an adapter trained on another precision of the "
                           "same checkpoint cannot match the exact fingerprint; if this is that checkpoint, "
                           "randmask_verify_base=False skips this check alone.") from None


MIN_PEFT = (0, 21)
"""The oldest peft this module works with (its tests run against it and against the newest peft installed)."""
MAPPINGS = ("PEFT_TYPE_TO_CONFIG_MAPPING", "PEFT_TYPE_TO_TUNER_MAPPING", "PEFT_TYPE_TO_PREFIX_MAPPING")


def _peft_version(version: str) -> tuple[int, int]:
    """(major, minor) of a version string: ``0.21.2`` -> (0, 21), ``1.0.0rc1`` -> (1, 0)."""
    parts = [int("".join(itertools.takewhile(str.isdigit, p)) or 0) for p in version.split(".")[:2]]
    return (parts + [0, 0])[0], (parts + [0, 0])[1]


def _check_version(version: str) -> None:
    """MaskingError for a peft older than ``MIN_PEFT``."""
    if _peft_version(version) < MIN_PEFT:
        need = ".".join(map(str, MIN_PEFT))
        raise MaskingError(f"randmask.peft needs peft >= {need}; this is peft {version}: pip install -U 'peft>={need}'")


def _mappings() -> list[dict]:
    """peft's config, tuner and prefix registries, found by name (a peft that moved them: a MaskingError)."""
    import peft.mapping

    found = [getattr(peft.mapping, name, None) for name in MAPPINGS]
    missing = [name for name, mapping in zip(MAPPINGS, found) if not isinstance(mapping, dict)]
    if missing:
        raise MaskingError(f"randmask.peft cannot register with peft {peft.__version__}: peft.mapping has no "
                           f"{', '.join(missing)} (peft 0.21 has them); install peft 0.21.x (pip install "
                           "'peft>=0.21,<0.22') or a randmask made for this peft")
    return found


def _register_public() -> bool:
    """Register through ``peft.utils.register_peft_method``; False when this peft refuses the name."""
    register = getattr(peft.utils, "register_peft_method", None)
    if register is None:
        return False
    try:
        register(name=PEFT_TYPE.lower(), config_cls=RandMaskConfig, model_cls=RandMaskModel, prefix=PREFIX)
    except ValueError:  # peft 0.21: "Unknown PEFT type RANDMASK" (only PeftType's own members are accepted)
        return False
    return True


def _register() -> None:
    """Make RANDMASK a PEFT method: peft's public registration where it accepts the name, else the three plain-dict
    mappings (what register_peft_method does, minus the enum check)."""
    _check_version(peft.__version__)
    config_map, tuner_map, prefix_map = _mappings()
    if config_map.get(PEFT_TYPE) is RandMaskConfig:
        return  # module re-imported
    if PEFT_TYPE in config_map or PEFT_TYPE in tuner_map:
        raise MaskingError(f"peft already has a method {PEFT_TYPE!r}; randmask cannot register over it.")
    if PREFIX in prefix_map.values():
        raise MaskingError(f"peft already uses the parameter prefix {PREFIX!r}.")
    if not _register_public():
        prefix_map[PEFT_TYPE] = PREFIX
        config_map[PEFT_TYPE] = RandMaskConfig
        tuner_map[PEFT_TYPE] = RandMaskModel
    reader = getattr(PeftConfigMixin, "_get_peft_type", None)  # the config's first reader: bounded
    if reader is None:
        warn_caller(f"peft {peft.__version__} has no PeftConfigMixin._get_peft_type: its first read of an "
                    "adapter_config.json is not size-bounded by randmask")
    elif not getattr(reader, "randmask_guard", False):
        PeftConfigMixin._get_peft_type = classmethod(guard_peft_type(reader.__func__))


_register()

__all__ = ["PEFT_TYPE", "RandMaskConfig", "RandMaskLayer", "RandMaskModel", "export_shira", "import_shira"]
