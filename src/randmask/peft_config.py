"""``RandMaskConfig``: the PEFT config of a Random Masking adapter. Its fields are those of
``randmask.MaskingConfig`` plus what injection records (the budget's denominator, mask checksums and base
fingerprints). Saving seals it: a checksum of its randmask fields and of the weights file beside it. Loading reads it
bounded and strict, then checks the seal.

Imports peft; registered, with ``RandMaskModel``, by ``randmask.peft``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peft.config import PeftConfig

from randmask.config import MaskingConfig, MaskingError
from randmask.masks import BUILTIN_KINDS
from randmask.peft_files import CONFIG_NAME, OPT_OUT, check_sealed, read_config, seal, weights_file
from randmask.peft_registry import PEFT_TYPE


@dataclass
class RandMaskConfig(PeftConfig):
    """PEFT config of a Random Masking adapter (the fields of ``randmask.MaskingConfig``)."""

    target_modules: list[str] | str | None = field(default=None, metadata={
        "help": "Module-name suffixes (['q_proj', 'v_proj']), a plain name, a regex, or GPT-2's "
                "'c_attn[q,v]'; None: the architecture's attention query/value projections."})
    exclude_modules: list[str] | str | None = field(default=None, metadata={
        "help": "Modules to leave out of target_modules' selection, matched as target_modules are (as PEFT's)."})
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
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
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
        return MaskingConfig(targets=self.target_modules, exclude=self.exclude_modules or None,
                             trainable_ratio=self.trainable_ratio,
                             density=self.density, mask_kind=self.mask_kind, seed=self.seed,
                             partition=tuple(self.partition) if self.partition is not None else None)

    def _json_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(self.to_dict(), default=sorted))

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """PEFT's save, sealed: the SHA-256 of the weights file PEFT wrote into the same folder just before, and a
        checksum of the randmask fields."""
        # PEFT writes a set as a list in the set's order (its inject_adapter makes target_modules="all-linear" the
        # set of module names): sorted here, so that the file holds the order the seal was computed over
        for name in ("target_modules", "exclude_modules"):
            if isinstance(getattr(self, name), (set, frozenset)):
                setattr(self, name, sorted(getattr(self, name)))
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


__all__ = ["RandMaskConfig"]
