"""Causal-LM mode: candidates scored by their mean token log-probability, LM loss, greedy decoding.

Speed where free: a classification step needs the vocabulary logits at a handful of positions
(the candidate's tokens), not at every position of a ~100-token prompt. ``logits_at`` runs the
model to its last hidden states, gathers the needed positions, and applies the LM head there
only, by swapping the head's input in a forward pre-hook. Going through the model's own forward
keeps everything a wrapper adds (peft prefixes and LoRA layers, Gemma's logit soft-capping).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from randmask_lab.errors import RunError
from randmask_lab.experiment.parts.data import LMItem, pad
from randmask_lab.tasks import GEN_STOP, TaskSpec, accuracy_any, mean_f1


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@contextlib.contextmanager
def logits_at(model: nn.Module, rows: torch.Tensor, cols: torch.Tensor) -> Iterator[None]:
    """Inside this block, ``model(...).logits`` is (1, M, V): the logits at (rows[m], cols[m]) only."""
    head = unwrap(model).get_output_embeddings()
    if head is None:
        raise RunError(f"{type(unwrap(model)).__name__} has no output embeddings (LM head); lm mode needs "
                       "a causal LM (use --mode head for encoders)")

    def gather(module: nn.Module, args: tuple) -> tuple:
        return (args[0][rows, cols].unsqueeze(0), *args[1:])  # (B, T, H) -> (1, M, H)

    handle = head.register_forward_pre_hook(gather)
    try:
        yield
    finally:
        handle.remove()


@dataclass(frozen=True)
class Span:
    """Tokens to score after the first ``start`` tokens of sequence ``seq``.

    The sequence must continue with ``tokens[:-1]`` (the last token is only predicted), so a
    one-token span can be read off any sequence that shares the prefix: candidates "Yes" and
    "No" are both scored from one pass over the context.
    """

    seq: int
    start: int
    tokens: tuple[int, ...]


def span_logprobs(model: nn.Module, seqs: Sequence[Sequence[int]], spans: Sequence[Span], pad_id: int,
                  positions_only: bool = True) -> torch.Tensor:
    """(S,) mean log-probability of each span's tokens given its sequence's prefix.

    ``positions_only=False`` computes the full (N, T, V) logits first (the reference path).
    """
    device = next(unwrap(model).parameters()).device
    where: dict[tuple[int, int], int] = {}  # (row, position) -> index into the gathered logits
    pick, targets, owner = [], [], []
    for k, span in enumerate(spans):
        if not 0 < span.start or not span.tokens or span.start + len(span.tokens) - 1 > len(seqs[span.seq]):
            raise RunError(f"span {span} needs a non-empty prefix and continuation inside its sequence")
        for j, token in enumerate(span.tokens):
            key = (span.seq, span.start - 1 + j)  # the logits at t predict token t + 1
            pick.append(where.setdefault(key, len(where)))
            targets.append(token)
            owner.append(k)
    rows = torch.tensor([r for r, _ in where], device=device)
    cols = torch.tensor([c for _, c in where], device=device)
    ids, mask = (t.to(device) for t in pad(seqs, pad_id))
    if positions_only:
        with logits_at(model, rows, cols):
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[0]  # (P, V)
    else:
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[rows, cols]  # (P, V)
    logp = torch.log_softmax(logits.float(), dim=-1)  # (P, V)
    values = logp[torch.tensor(pick, device=device), torch.tensor(targets, device=device)]  # (Q,)
    owner_t = torch.tensor(owner, device=device)
    sums = torch.zeros(len(spans), device=device).index_add(0, owner_t, values)
    return sums / torch.bincount(owner_t, minlength=len(spans))


def candidate_requests(items: Sequence[LMItem]) -> tuple[list[tuple[int, ...]], list[Span], list[tuple[int, int]]]:
    """Sequences, spans and (item, candidate) owners that score every candidate of ``items``.

    One sequence per multi-token candidate; one-token candidates ride on the item's first
    sequence (or on the bare context), since they all need only the logits after the context.
    """
    seqs: list[tuple[int, ...]] = []
    spans: list[Span] = []
    owners: list[tuple[int, int]] = []
    for b, item in enumerate(items):
        ctx, first = item.context, len(seqs)
        for k, cand in enumerate(item.candidates):
            if len(cand) > 1:
                seqs.append(ctx + cand)
                spans.append(Span(len(seqs) - 1, len(ctx), cand))
                owners.append((b, k))
        singles = [(k, c) for k, c in enumerate(item.candidates) if len(c) == 1]
        if singles and len(seqs) == first:
            seqs.append(ctx)
        spans += [Span(first, len(ctx), c) for _, c in singles]
        owners += [(b, k) for k, _ in singles]
    return seqs, spans, owners


def candidate_scores(model: nn.Module, items: Sequence[LMItem], pad_id: int,
                     positions_only: bool = True) -> torch.Tensor:
    """(B, K) mean log-prob of each candidate; -inf where an item has fewer than K candidates."""
    seqs, spans, owners = candidate_requests(items)
    scores = span_logprobs(model, seqs, spans, pad_id, positions_only)
    out = torch.full((len(items), max(len(x.candidates) for x in items)), float("-inf"), device=scores.device)
    b_idx, k_idx = zip(*owners, strict=True)
    out[list(b_idx), list(k_idx)] = scores
    return out


def target_scores(model: nn.Module, items: Sequence[LMItem], pad_id: int, positions_only: bool = True
                  ) -> torch.Tensor:
    """(B,) mean log-prob of each item's gold continuation."""
    seqs = [x.context + x.target for x in items]
    spans = [Span(i, len(x.context), x.target) for i, x in enumerate(items)]
    return span_logprobs(model, seqs, spans, pad_id, positions_only)


def _chunks(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Indices sorted by length (less padding), cut into chunks of at most ``budget`` sequences."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i:i + budget] for i in range(0, len(order), budget)]


class LMObjective:
    """Training loss and evaluation of a task in causal-LM mode."""

    def __init__(self, spec: TaskSpec, tokenizer: Any, pad_id: int, eval_batch_size: int = 16,
                 max_new_tokens: int = 50, positions_only: bool = True) -> None:
        self.spec, self.tokenizer, self.pad_id = spec, tokenizer, pad_id
        self.eval_batch_size, self.max_new_tokens = eval_batch_size, max_new_tokens
        self.positions_only = positions_only

    def loss(self, model: nn.Module, items: Sequence[LMItem]) -> torch.Tensor:
        """Mean training loss of ``items`` (the task's loss: candidates CE, or LM loss on the target)."""
        if self.spec.loss == "candidates":
            scores = candidate_scores(model, items, self.pad_id, self.positions_only)  # (B, K)
            golds = torch.tensor([x.gold for x in items], device=scores.device)
            return F.cross_entropy(scores, golds)
        return -target_scores(model, items, self.pad_id, self.positions_only).mean()

    @torch.no_grad()
    def evaluate(self, model: nn.Module, items: Sequence[LMItem], with_metric: bool
                 ) -> tuple[list[float], list[Any] | None]:
        """Per-item loss, and per-item predictions (candidate index or generated text) if asked."""
        if items and items[0].candidates:
            scores = self._all_candidate_scores(model, items)
            losses = [self._item_loss(s, x) for s, x in zip(scores, items, strict=True)]
            return losses, [int(torch.tensor(s).argmax()) for s in scores]
        losses = self._all_target_losses(model, items)
        preds = self.generate(model, [x.context for x in items]) if with_metric else None
        return losses, preds

    def metric(self, predictions: Sequence[Any], items: Sequence[LMItem]) -> float:
        """Accuracy of candidate indices (any right one: ReCoRD's gold entity aliases, as MeZO scores it), or mean
        SQuAD F1 of generated strings."""
        if self.spec.metric == "accuracy":
            return accuracy_any(list(predictions), [x.right or (x.gold,) for x in items])
        return mean_f1([str(p) for p in predictions], [x.answers for x in items])

    def _item_loss(self, scores: list[float], item: LMItem) -> float:
        s = torch.tensor(scores)
        if self.spec.loss == "candidates":
            return float(-torch.log_softmax(s, 0)[item.gold])
        return float(-s[item.gold])  # the gold candidate is the target: its LM loss

    def _all_candidate_scores(self, model: nn.Module, items: Sequence[LMItem]) -> list[list[float]]:
        # Chunks of items whose sequences total at most eval_batch_size, shortest items first.
        cost = [max(1, sum(len(c) > 1 for c in x.candidates)) for x in items]
        order = sorted(range(len(items)), key=lambda i: len(items[i].context))
        chunks, current, used = [], [], 0
        for i in order:
            if current and used + cost[i] > self.eval_batch_size:
                chunks.append(current)
                current, used = [], 0
            current.append(i)
            used += cost[i]
        chunks += [current] if current else []
        per_item: list[list[float]] = [[] for _ in items]
        for chunk in chunks:
            scores = candidate_scores(model, [items[i] for i in chunk], self.pad_id, self.positions_only)
            for i, row in zip(chunk, scores.tolist(), strict=True):
                per_item[i] = row[: len(items[i].candidates)]
        return per_item

    def _all_target_losses(self, model: nn.Module, items: Sequence[LMItem]) -> list[float]:
        losses = [0.0] * len(items)
        for chunk in _chunks([len(x.context) + len(x.target) for x in items], self.eval_batch_size):
            out = target_scores(model, [items[j] for j in chunk], self.pad_id, self.positions_only)
            for j, v in zip(chunk, out.tolist(), strict=True):
                losses[j] = -v
        return losses

    def generate(self, model: nn.Module, contexts: Sequence[Sequence[int]]) -> list[str]:
        """Greedy continuations (at most ``max_new_tokens``), cut at the first newline."""
        inner = unwrap(model)
        device = next(inner.parameters()).device
        answers = [""] * len(contexts)
        for chunk in _chunks([len(c) for c in contexts], self.eval_batch_size):
            ids, mask = pad([contexts[j] for j in chunk], self.pad_id, left=True)
            out = inner.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 num_beams=1, max_new_tokens=self.max_new_tokens, pad_token_id=self.pad_id,
                                 stop_strings=GEN_STOP, tokenizer=self.tokenizer)
            for j, row in zip(chunk, out[:, ids.shape[1]:], strict=True):
                text = self.tokenizer.decode(row, skip_special_tokens=True)
                answers[j] = text.split(GEN_STOP)[0].strip()
        return answers
