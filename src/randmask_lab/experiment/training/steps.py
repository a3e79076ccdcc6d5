"""Per-step pieces of the training loop: optimizer, LR schedule, the step CSV."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import torch

from randmask import atomic_write_bytes
from randmask_lab.errors import RunError
from randmask_lab.experiment.run.config import RunConfig
from randmask_lab.fs import make_folder
from randmask_lab.methods import PreparedModel
from randmask_lab.methods.prepared import is_head_param

LOG_FIELDS = ("step", "epoch", "loss", "lr", "seconds")


def build_optimizer(prepared: PreparedModel, config: RunConfig, heads: list[str]) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; the head in its own group when ``head_lr`` is set."""
    named = [(n, p) for n, p in prepared.model.named_parameters() if p.requires_grad]
    head = [p for n, p in named if config.head_lr is not None and is_head_param(n, heads)]
    if config.head_lr is not None and not head:  # accepted and ignored, it would be a new run id that ran as without
        raise RunError(f"--head-lr sets the task head's learning rate, and this run trains no head parameter (method "
                       f"{config.method}, head modules {heads or 'none'}); drop --head-lr")
    head_ids = {id(p) for p in head}
    groups = [{"params": [p for _, p in named if id(p) not in head_ids], "lr": config.lr}]
    if head:
        groups.append({"params": head, "lr": config.head_lr})
    groups = [g for g in groups if g["params"]]
    for g in groups:
        g["initial_lr"] = g["lr"]
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.adam_betas, eps=config.adam_eps,
                             weight_decay=config.weight_decay)


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """Multiplier of the peak LR at 0-based ``step``: linear warm-up, then constant/linear/cosine."""
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> float:
    """Scale every group's initial LR by ``factor``; returns the first group's LR."""
    for g in optimizer.param_groups:
        g["lr"] = g["initial_lr"] * factor
    return optimizer.param_groups[0]["lr"]


class StepLog:
    """Append-only CSV of (step, epoch, loss, lr, seconds); on resume, rows past the checkpoint go."""

    def __init__(self, path: Path | None, resume_step: int) -> None:
        self.path = path
        if path is None:
            return
        make_folder(path.parent)
        rows = []
        if path.is_file() and resume_step > 0:
            with path.open(newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get("step", "").isdigit() and int(r["step"]) <= resume_step]
        text = io.StringIO()
        writer = csv.DictWriter(text, LOG_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_bytes(path, text.getvalue().encode())  # a kill now leaves the old log or the new one

    def write(self, step: int, epoch: int, loss: float, lr: float, seconds: float) -> None:
        """Add one row."""
        if self.path is None:
            return
        with self.path.open("a", newline="") as f:
            csv.writer(f).writerow([step, epoch, f"{loss:.6g}", f"{lr:.6g}", f"{seconds:.3f}"])
