"""Tokenisation, padding and batching for both modes (causal-LM prompts, encoder pairs)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from randmask_lab.errors import RunError
from randmask_lab.tasks import PairExample, Prompt


@dataclass(frozen=True)
class LMItem:
    """A prompt as token ids. ``context + candidates[k]`` is candidate k's full sequence;
    ``context + target`` the gold one (equal to the gold candidate's where there are candidates)."""

    context: tuple[int, ...]
    candidates: tuple[tuple[int, ...], ...]
    target: tuple[int, ...]
    gold: int | None
    answers: tuple[str, ...]
    right: tuple[int, ...] = ()  # every candidate accuracy counts as right (``Prompt.right``: ReCoRD's aliases)


@dataclass(frozen=True)
class HeadItem:
    """A text pair as encoder inputs, with its class label."""

    input_ids: tuple[int, ...]
    token_type_ids: tuple[int, ...] | None
    label: int


def bos_prefix(tokenizer: Any, force: bool = False) -> tuple[int, ...]:
    """The <bos> to put before every prompt: when forced (Gemma) or when the tokenizer adds one itself."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return ()
    if force:
        return (bos,)
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return (bos,) if ids and ids[0] == bos else ()


def _ids(tokenizer: Any, text: str) -> tuple[int, ...]:
    return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_prompt(tokenizer: Any, prompt: Prompt, max_length: int, bos: tuple[int, ...] = ()) -> LMItem:
    """Tokenise a prompt; cut the context from the left so the longest continuation still fits.

    Candidates are tokenised apart from the context (MeZO's convention), so every candidate's
    tokens are exactly its own, whatever the context ends with.
    """
    candidates = tuple(_ids(tokenizer, c) for c in prompt.candidates)
    target = _ids(tokenizer, prompt.target)
    if not target or any(not c for c in candidates):
        raise RunError(f"prompt {prompt.uid}: a candidate or target tokenises to nothing")
    longest = max(len(x) for x in (*candidates, target))
    room = max_length - longest - len(bos)
    if room < 1:
        raise RunError(f"--max-length {max_length} leaves no room for the context of {prompt.uid} "
                       f"(its longest continuation has {longest} tokens); raise --max-length")
    context = _ids(tokenizer, prompt.text)
    return LMItem(bos + context[-room:], candidates, target, prompt.gold, prompt.answers, prompt.right)


def encode_pair(tokenizer: Any, pair: PairExample, max_length: int) -> HeadItem:
    """Tokenise ``(text_a, text_b)`` as ``[CLS] a [SEP] b [SEP]``, cutting the longer text first."""
    enc = tokenizer(pair.text_a, pair.text_b, truncation=True, max_length=max_length)
    types = enc.get("token_type_ids")
    return HeadItem(tuple(enc["input_ids"]), tuple(types) if types is not None else None, pair.label)


def pad(seqs: Sequence[Sequence[int]], pad_id: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask), both (N, T): sequences padded to the longest, on the right by default."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        span = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, span] = torch.tensor(s, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def collate_head(items: Sequence[HeadItem], pad_id: int) -> dict[str, torch.Tensor]:
    """Encoder inputs (input_ids, attention_mask[, token_type_ids]) and labels for a batch."""
    ids, mask = pad([x.input_ids for x in items], pad_id)
    batch = {"input_ids": ids, "attention_mask": mask}
    if items[0].token_type_ids is not None:
        batch["token_type_ids"], _ = pad([x.token_type_ids or () for x in items], 0)
    batch["labels"] = torch.tensor([x.label for x in items], dtype=torch.long)
    return batch


def epoch_order(n: int, order_seed: int, epoch: int) -> list[int]:
    """The training order of epoch ``epoch``: a permutation of range(n) fixed by (order_seed, epoch).

    A function of the seed and the epoch alone, so a resumed run replays the same order.
    """
    order = list(range(n))
    random.Random(f"order:{order_seed}:{epoch}").shuffle(order)
    return order


def item_length(item: LMItem | HeadItem) -> int:
    """Tokens of the longest sequence a training step builds for ``item``, to within one (a sort key)."""
    if isinstance(item, HeadItem):
        return len(item.input_ids)
    return len(item.context) + max(len(x) for x in (*item.candidates, item.target))


def length_grouped_order(order: Sequence[int], lengths: Sequence[int], step: int) -> list[int]:
    """``order`` with examples of similar length brought together, as transformers' group_by_length.

    The shuffled order is cut into mega-batches of ``k * step`` examples, k = min(n // (4 * step), 50)
    (at least 1, so there are several mega-batches and batches still mix across the epoch), and
    each mega-batch is sorted longest first. A step then pads to nearly its own length: on the
    study's BoolQ sample, 1.23x the real tokens instead of 1.96x in the plain order
    (``python benchmarks/length_grouping.py``).
    """
    mega = max(1, min(len(order) // (4 * step), 50)) * step
    chunks = [order[i:i + mega] for i in range(0, len(order), mega)]
    return [i for chunk in chunks for i in sorted(chunk, key=lambda i: -lengths[i])]


def step_batches(order: Sequence[int], batch_size: int, world: int = 1, rank: int = 0) -> list[list[int]]:
    """This process's example indices for each optimizer step of an epoch.

    Each step takes ``batch_size * world`` consecutive examples of the order, and rank r gets
    the r-th slice of ``batch_size`` (the paper's "batch size 8 per GPU"). A single process
    keeps the last partial batch; with several, a partial last step is dropped so every rank
    takes the same number of steps (DDP needs that).
    """
    step = batch_size * world
    n_steps = len(order) // step if world > 1 else -(-len(order) // step)
    return [list(order[s * step + rank * batch_size: s * step + (rank + 1) * batch_size])
            for s in range(n_steps)]


def epoch_batches(n: int, order_seed: int, epoch: int, batch_size: int, world: int = 1, rank: int = 0,
                  lengths: Sequence[int] | None = None) -> list[list[int]]:
    """This process's example indices for each step of epoch ``epoch``: the seeded shuffled order, grouped
    by length when ``lengths`` is given (``--group-by-length``), cut into steps by ``step_batches``."""
    order = epoch_order(n, order_seed, epoch)
    if lengths is not None:
        order = length_grouped_order(order, lengths, batch_size * world)
    return step_batches(order, batch_size, world, rank)


def grouping_lengths(train: Sequence[LMItem | HeadItem], group_by_length: bool) -> list[int] | None:
    """The ``lengths`` that ``epoch_batches`` groups ``train`` by: each item's length under
    ``--group-by-length``, else None (the plain shuffled order)."""
    return [item_length(x) for x in train] if group_by_length else None


def micro_batches(indices: Sequence[int], n: int) -> list[list[int]]:
    """Split one step's indices into ``n`` near-equal micro-batches (empty ones dropped)."""
    size = -(-len(indices) // n)
    return [list(indices[i:i + size]) for i in range(0, len(indices), size)]
