"""What every method returns: the model to train, a trainable-count report, a per-step hook."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from randmask import logical_numel
from randmask_lab.fs import write_json
from randmask_lab.methods.trainable import (
    load_trainable,
    read_tensors,
    tensor_file_limit,
    trainable_tensors,
    write_tensors,
)

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


MethodState = tuple[dict[str, torch.Tensor], dict[str, Any]]
"""(tensors, JSON-ready metadata) a method keeps outside its parameters, for checkpoints."""


@dataclass
class PreparedModel:
    """A model ready to train with one fine-tuning method, and everything the loop needs from it.

    The training loop never names a method: what differs between methods lives here.
    `model` may be a peft wrapper; call it exactly like the base model. `on_step`, when not
    None, must be called by the training loop after every `optimizer.step()` and *before*
    `optimizer.zero_grad()`, with the 0-based index of the step just taken (AdaLoRA's
    `update_and_allocate`). `extra_loss` returns a term to add to the task loss (AdaLoRA's
    orthogonality penalty) or None. `get_state` / `set_state` save and restore training state
    kept outside the parameters (AdaLoRA's importance scores and rank pattern). `save_native`
    writes the method's own adapter format (randmask's `save_adapter`, peft's `save_pretrained`).
    `fp32_trainable`: the method's trainable tensors are its own (adapters, masked values) and
    stay fp32 under ``bf16-true``; False when it trains base weights (full, bitfit). `trains`: False
    when nothing trains (zeroshot: the runner only evaluates).
    """

    model: nn.Module
    report: TrainableReport
    on_step: Callable[[int], None] | None = None
    adapted: list[str] = field(default_factory=list)
    """The matrices the method adapts (``name`` or ``name[q,v]`` for fused blocks), from
    ``randmask.resolve_targets``: the same on every method that takes targets."""
    extra_loss: Callable[[], torch.Tensor | None] | None = None
    get_state: Callable[[], MethodState] | None = None
    set_state: Callable[[dict[str, torch.Tensor], dict[str, Any]], None] | None = None
    save_native: Callable[[Path], None] | None = None
    fp32_trainable: bool = True
    trains: bool = True
    """False: nothing trains (zeroshot); the runner only evaluates the model."""
    needs_prompts: bool = False
    """True: the method only makes sense with prompt scoring (zeroshot: an untrained head scores chance)."""

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters to hand to the optimizer."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Detached CPU copies of the trainable tensors, by parameter name."""
        return trainable_tensors(self.model)

    def loss_terms(self) -> torch.Tensor | None:
        """The method's extra loss term for this step (None: none)."""
        return self.extra_loss() if self.extra_loss is not None else None

    def after_step(self, step: int) -> None:
        """The per-step hook (see class doc); a no-op for most methods."""
        if self.on_step is not None:
            self.on_step(step)

    def method_state(self) -> MethodState:
        """Training state the method keeps outside its parameters (empty for most methods)."""
        return self.get_state() if self.get_state is not None else ({}, {})

    def restore_method_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Inverse of `method_state`."""
        if self.set_state is not None:
            self.set_state(tensors, meta)

    def save(self, path: str | Path) -> Path:
        """Write the trainable tensors and the report to the folder `path` (atomically); return it."""
        out = Path(path)
        write_tensors(out / TRAINABLE_FILE, self.trainable_state_dict())
        write_json(out / REPORT_FILE, self.report.to_dict())
        return out

    def save_adapter(self, path: str | Path) -> None:
        """The method's own adapter format in folder `path`, when it has one."""
        if self.save_native is not None:
            self.save_native(Path(path))

    def load(self, path: str | Path) -> None:
        """Load tensors written by `save` into a model prepared with the same method and options."""
        file = Path(path) / TRAINABLE_FILE
        if not file.exists():
            raise FileNotFoundError(f"{file} not found: pass the folder given to PreparedModel.save()")
        load_trainable(self.model, read_tensors(file, tensor_file_limit(self.model)), source=str(file))


def count_parameters(model: nn.Module) -> int:
    """Number of parameters of `model`, shared (tied) tensors counted once; a packed 4-bit weight counts
    its entries (so a quantized base has its float base's count)."""
    return sum(logical_numel(p) for p in model.parameters())


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
