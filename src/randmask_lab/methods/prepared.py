"""What every method returns: the model to train, a trainable-count report, a per-step hook."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

TRAINABLE_FILE = "trainable.safetensors"
REPORT_FILE = "method.json"


@dataclass
class TrainableReport:
    """Trainable-parameter count of a prepared model.

    `total` is the parameter count of the base model *before* the method was applied (shared
    tensors counted once), so ratios are comparable across methods, as in the paper's tables.
    `groups` splits `trainable` by kind (e.g. ``{"lora": 4096, "head": 66}``); `notes` records
    decisions a reader of the results should know (e.g. "RMSNorm has no bias").
    """

    method: str
    trainable: int
    total: int
    groups: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        """Trainable parameters as a fraction of the base model's parameters."""
        return self.trainable / self.total if self.total else 0.0

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form (includes `ratio`)."""
        return {**asdict(self), "ratio": self.ratio}

    def __str__(self) -> str:
        parts = ", ".join(f"{k}={v:,}" for k, v in self.groups.items())
        return (
            f"{self.method}: {self.trainable:,} / {self.total:,} trainable "
            f"({100 * self.ratio:.4f}%) [{parts}]"
        )


@dataclass
class PreparedModel:
    """A model ready to train with one fine-tuning method.

    `model` may be a peft wrapper; call it exactly like the base model. `on_step`, when not
    None, must be called by the training loop after every `optimizer.step()` and *before*
    `optimizer.zero_grad()`, with the 0-based index of the step just taken.
    """

    model: nn.Module
    report: TrainableReport
    on_step: Callable[[int], None] | None = None
    adapted: list[str] = field(default_factory=list)
    """The matrices the method adapts (``name`` or ``name[q,v]`` for fused blocks), from
    ``randmask.resolve_targets``: the same on every method that takes targets."""

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters to hand to the optimizer."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Detached CPU copies of the trainable tensors, by parameter name."""
        return {
            n: p.detach().cpu().contiguous().clone()
            for n, p in self.model.named_parameters()
            if p.requires_grad
        }

    def save(self, path: str | Path) -> Path:
        """Write the trainable tensors and the report to the folder `path`; return it."""
        from safetensors.torch import save_file

        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        save_file(self.trainable_state_dict(), str(out / TRAINABLE_FILE))
        (out / REPORT_FILE).write_text(json.dumps(self.report.to_dict(), indent=2))
        return out

    def load(self, path: str | Path) -> None:
        """Load tensors written by `save` into a model prepared with the same method and options."""
        from safetensors.torch import load_file

        file = Path(path) / TRAINABLE_FILE
        if not file.exists():
            raise FileNotFoundError(f"{file} not found: pass the folder given to PreparedModel.save()")
        saved = load_file(str(file))
        params = dict(self.model.named_parameters())
        missing = sorted(set(saved) - set(params))
        if missing:
            raise ValueError(
                f"{len(missing)} saved tensors have no parameter here (first: {missing[0]!r}); "
                "prepare the model with the same method, targets and options before loading"
            )
        with torch.no_grad():
            for name, tensor in saved.items():
                if params[name].shape != tensor.shape:
                    raise ValueError(
                        f"shape mismatch for {name!r}: saved {tuple(tensor.shape)}, "
                        f"model {tuple(params[name].shape)}; was it prepared with other options?"
                    )
                params[name].copy_(tensor)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters of `model`, shared (tied) tensors counted once."""
    return sum(p.numel() for p in model.parameters())


def build_report(
    method: str,
    model: nn.Module,
    total: int,
    heads: list[str],
    label: Callable[[str], str] | None = None,
    notes: list[str] | None = None,
    frozen: dict[str, int] | None = None,
) -> TrainableReport:
    """Count `model`'s trainable parameters, grouped by `label(name)` or "head".

    `frozen` subtracts entries per group that have ``requires_grad`` but are held at zero (the
    rows of peft's B outside GPT-2's q/v blocks), so the count is what the method really trains."""
    groups: dict[str, int] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        group = "head" if is_head_param(name, heads) else (label(name) if label else method)
        groups[group] = groups.get(group, 0) + p.numel()
    for group, n in (frozen or {}).items():
        groups[group] = groups.get(group, 0) - n
    return TrainableReport(method, sum(groups.values()), total, groups, list(notes or []))


def is_head_param(name: str, heads: list[str]) -> bool:
    """True when parameter `name` lies under one of the head modules (dotted suffixes)."""
    dotted = "." + name
    return any(f".{h}." in dotted for h in heads)
