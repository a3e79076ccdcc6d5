"""Classification-head mode: an encoder (MiniLM, BERT) + a sequence-classification head, CE loss."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from randmask_lab.experiment.parts.data import HeadItem, collate_head
from randmask_lab.experiment.parts.lm import unwrap
from randmask_lab.tasks import accuracy


class HeadObjective:
    """Training loss and evaluation of a classification task on an encoder with a head."""

    def __init__(self, pad_id: int, eval_batch_size: int = 64) -> None:
        self.pad_id, self.eval_batch_size = pad_id, eval_batch_size

    def _logits(self, model: nn.Module, items: Sequence[HeadItem]) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(unwrap(model).parameters()).device
        batch = {k: v.to(device) for k, v in collate_head(items, self.pad_id).items()}
        labels = batch.pop("labels")
        return model(**batch).logits.float(), labels  # (B, C), (B,)

    def loss(self, model: nn.Module, items: Sequence[HeadItem]) -> torch.Tensor:
        """Mean cross-entropy of the head's logits."""
        logits, labels = self._logits(model, items)
        return F.cross_entropy(logits, labels)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, items: Sequence[HeadItem], with_metric: bool
                 ) -> tuple[list[float], list[int]]:
        """Per-item cross-entropy and predicted class."""
        order = sorted(range(len(items)), key=lambda i: len(items[i].input_ids))  # less padding
        losses, preds = [0.0] * len(items), [0] * len(items)
        for s in range(0, len(order), self.eval_batch_size):
            chunk = order[s:s + self.eval_batch_size]
            logits, labels = self._logits(model, [items[i] for i in chunk])
            item_loss = F.cross_entropy(logits, labels, reduction="none")
            for i, loss, pred in zip(chunk, item_loss.tolist(), logits.argmax(-1).tolist(), strict=True):
                losses[i], preds[i] = loss, pred
        return losses, preds

    def metric(self, predictions: Sequence[int], items: Sequence[HeadItem]) -> float:
        """Accuracy."""
        return accuracy(list(predictions), [x.label for x in items])
