"""MaskingConfig: what to mask, how much, and how the mask is drawn."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any


class MaskingError(ValueError):
    """Bad user input to randmask (config, targets, budget, adapter files).

    Every message names the problem and the fix.
    """


@dataclass
class MaskingConfig:
    """Configuration of a Random Masking adapter.

    Exactly one of ``trainable_ratio`` and ``density`` sets the budget.
    """

    targets: list[str] | str | None = None
    """Modules to mask. A list matches module-name suffixes (``"q_proj"`` matches
    ``model.layers.0.self_attn.q_proj``); a plain name string (``"q_proj"``) is the
    same as ``["q_proj"]``; any other string is a regex that must match the whole module name.
    A fused projection can be restricted to column blocks:
    ``"c_attn[q,v]"`` (GPT-2). ``None`` uses the architecture's default (attention
    query and value projections)."""

    exclude: list[str] | str | None = None
    """Modules to leave out of ``targets``' selection, matched as ``targets`` are (suffixes of whole name components,
    a plain name, or a regex over whole names): ``targets="all_linear"``-style sets minus a vision tower or a head.
    PEFT's ``exclude_modules``. A list item that matches no module of the model is refused (a typo would exclude
    nothing)."""

    trainable_ratio: float | None = None
    """Trainable entries as a fraction of ALL model parameters (the paper's
    definition: 1e-5 is its 0.001%), spread evenly over the targeted matrices."""

    density: float | None = None
    """Per-matrix keep probability p in (0, 1]. Alternative to ``trainable_ratio``."""

    mask_kind: str = "random"
    """``random`` (i.i.d. Bernoulli(p), the paper's), ``random_exact`` (exactly
    round(p*N) entries), ``structured`` (whole input columns, the paper's ablation),
    ``custom`` (indices given to ``apply_masking``), or a kind added with
    ``randmask.register_mask_kind``."""

    seed: int = 0
    """Global mask seed. Each matrix's mask seed is derived from (seed, module name)."""

    partition: tuple[int, int] | None = None
    """``(k, n)``: draw this adapter's mask as part k (0-based) of n disjoint parts of one draw
    at n times the density, made from ``seed``. Adapters with the same seed, budget and n and
    different k never share an entry (disjoint by construction, for merging), and each is still
    regenerated from its own config alone. Each entry is kept with about the same probability as
    without ``partition``. ``random`` and ``random_exact`` masks only; needs n * density <= 1."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``MaskingError`` if the config is inconsistent."""
        if (self.trainable_ratio is None) == (self.density is None) and self.mask_kind != "custom":
            raise MaskingError(
                "MaskingConfig needs exactly one budget: set trainable_ratio (fraction of all model "
                f"parameters, e.g. 1e-4) or density (per-matrix keep probability); got "
                f"trainable_ratio={self.trainable_ratio}, density={self.density}."
            )
        if self.density is not None and not (_finite(self.density) and 0.0 < self.density <= 1.0):
            raise MaskingError(
                f"density={self.density!r} is outside (0, 1]: it is the probability that an entry "
                "is trainable. Use e.g. density=0.01 for 1% of each matrix."
            )
        if self.trainable_ratio is not None and not (
            _finite(self.trainable_ratio) and 0.0 < self.trainable_ratio <= 1.0
        ):
            raise MaskingError(
                f"trainable_ratio={self.trainable_ratio!r} is outside (0, 1]: it is the fraction of all "
                "model parameters to train. The paper uses 1e-3, 1e-4 and 1e-5."
            )
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise MaskingError(f"seed={self.seed!r} must be a non-negative int.")
        if self.targets is not None and not isinstance(self.targets, (str, list, tuple)):
            raise MaskingError(
                f"targets={self.targets!r} must be a list of module-name suffixes or a regex string."
            )
        if isinstance(self.targets, tuple):
            self.targets = list(self.targets)
        if isinstance(self.exclude, tuple):
            self.exclude = list(self.exclude)
        if self.exclude is not None and not ((isinstance(self.exclude, str) and self.exclude) or (
                isinstance(self.exclude, list) and all(isinstance(t, str) and t for t in self.exclude))):
            raise MaskingError(f"exclude={self.exclude!r} must be a list of module-name suffixes or a regex string.")
        if isinstance(self.targets, list) and not all(isinstance(t, str) for t in self.targets):
            raise MaskingError(f"targets={self.targets!r} must hold module-name strings only.")
        if not isinstance(self.mask_kind, str):
            raise MaskingError(f"mask_kind={self.mask_kind!r} must be a string such as 'random'.")
        if isinstance(self.targets, list) and not self.targets:
            raise MaskingError("targets is an empty list: name at least one module, or pass None.")
        if self.partition is not None:
            self._validate_partition()

    def _validate_partition(self) -> None:
        part = self.partition
        ok = (isinstance(part, (tuple, list)) and len(part) == 2
              and all(isinstance(v, int) and not isinstance(v, bool) for v in part) and 0 <= part[0] < part[1])
        if not ok or part[1] < 2:
            raise MaskingError(f"partition={part!r} must be (k, n) with n >= 2 parts and 0 <= k < n, e.g. (0, 4) for "
                               "the first of four adapters whose masks must not overlap.")
        self.partition = (part[0], part[1])
        if self.mask_kind not in ("random", "random_exact"):
            raise MaskingError(f"partition splits random masks; mask_kind={self.mask_kind!r} is not one. Use "
                               "mask_kind='random' or 'random_exact', or drop partition.")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (saved in ``adapter_config.json``); ``partition`` and ``exclude`` only when set."""
        data = dataclasses.asdict(self)
        for optional in ("partition", "exclude"):
            if data[optional] is None:
                data.pop(optional)  # files of adapters without them stay as they were
        if "partition" in data:
            data["partition"] = list(data["partition"])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MaskingConfig:
        """Inverse of ``to_dict``; unknown keys are an error (a file from another tool)."""
        if not isinstance(data, dict):
            raise MaskingError(f"adapter masking_config is {type(data).__name__}, not an object; re-save the adapter.")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise MaskingError(
                f"adapter config has unknown MaskingConfig fields {sorted(unknown)}; it was written "
                "by another tool or a newer randmask. Upgrade randmask or re-save the adapter."
            )
        return cls(**data)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


__all__ = ["MaskingConfig", "MaskingError"]
