"""Tokenisation (left truncation keeps the answer), padding, and the seeded batch order."""

from __future__ import annotations

import pytest
import transformers as tf

from randmask_lab.experiment.parts.data import (
    bos_prefix,
    encode_pair,
    encode_prompt,
    epoch_order,
    grouping_lengths,
    item_length,
    length_grouped_order,
    micro_batches,
    pad,
    step_batches,
)
from randmask_lab.tasks import PairExample, Prompt


@pytest.fixture(scope="module")
def tok(tiny_lm):
    return tf.AutoTokenizer.from_pretrained(tiny_lm)


def test_context_is_cut_from_the_left_and_candidates_kept(tok):
    prompt = Prompt("u1", "The cat sat on the mat. " * 20 + "It was", " great", (" terrible", " great"), 1)
    item = encode_prompt(tok, prompt, max_length=24, bos=(1,))
    longest = max(len(c) for c in item.candidates)
    assert len(item.context) + longest == 24 and item.context[0] == 1
    full = tok(prompt.text, add_special_tokens=False)["input_ids"]
    assert item.context[1:] == tuple(full[-(24 - longest - 1):])  # the end of the text survives
    assert item.candidates[1] == item.target == tuple(tok(" great", add_special_tokens=False)["input_ids"])


def test_too_short_max_length_is_a_clear_error(tok):
    prompt = Prompt("u1", "abc", " great", (" terrible", " great"), 1)
    with pytest.raises(ValueError, match="--max-length"):
        encode_prompt(tok, prompt, max_length=2)


def test_bos_prefix(tok):
    assert bos_prefix(tok, force=True) == (tok.bos_token_id,)
    assert bos_prefix(tok) == ()  # this tokenizer adds no <bos> by itself


def test_pair_encoding(tiny_bert):
    tokenizer = tf.AutoTokenizer.from_pretrained(tiny_bert)
    item = encode_pair(tokenizer, PairExample("a b", "c", 1), max_length=16)
    assert item.label == 1 and item.token_type_ids[-2:] == (1, 1)
    assert item_length(item) == len(item.input_ids)  # what --group-by-length sorts head-mode pairs by


def test_pad_right_and_left():
    ids, mask = pad([(1, 2, 3), (4,)], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = pad([(1, 2, 3), (4,)], pad_id=0, left=True)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_epoch_order_is_a_function_of_seed_and_epoch():
    assert epoch_order(50, 3, 1) == epoch_order(50, 3, 1)
    assert epoch_order(50, 3, 1) != epoch_order(50, 3, 2) != epoch_order(50, 4, 1)
    assert sorted(epoch_order(50, 3, 1)) == list(range(50))


def test_step_batches_single_and_distributed():
    order = list(range(10))
    assert step_batches(order, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]  # partial last kept
    rank0, rank1 = step_batches(order, 2, world=2, rank=0), step_batches(order, 2, world=2, rank=1)
    assert rank0 == [[0, 1], [4, 5]] and rank1 == [[2, 3], [6, 7]]  # partial global step dropped
    assert micro_batches([1, 2, 3, 4, 5], 2) == [[1, 2, 3], [4, 5]]


def _padded_tokens(batches, lengths):
    return sum(max(lengths[i] for i in b) * len(b) for b in batches)


def test_length_grouping_sorts_within_mega_batches_only():
    lengths = [(i * 37) % 101 + 1 for i in range(200)]
    order = epoch_order(200, 0, 0)
    grouped = length_grouped_order(order, lengths, step=8)
    assert sorted(grouped) == list(range(200))
    mega = 200 // (4 * 8) * 8  # transformers' rule: min(n // (4 * step), 50) steps per mega-batch
    for start in range(0, 200, mega):
        chunk = grouped[start:start + mega]
        assert set(chunk) == set(order[start:start + mega])  # no example leaves its mega-batch
        assert [lengths[i] for i in chunk] == sorted((lengths[i] for i in chunk), reverse=True)
    plain = _padded_tokens(step_batches(order, 8), lengths)
    assert _padded_tokens(step_batches(grouped, 8), lengths) < 0.8 * plain


def test_length_grouping_keeps_the_order_of_equal_lengths_and_tiny_sets():
    order = epoch_order(30, 1, 0)
    assert length_grouped_order(order, [5] * 30, step=8) == order
    assert sorted(length_grouped_order(order[:3], list(range(30)), step=8)) == sorted(order[:3])


def test_item_length_is_the_longest_sequence_of_a_step(tok):
    item = encode_prompt(tok, Prompt("t", "Is it?", " No way at all", (" Yes", " No way at all"), 1), 64)
    assert item_length(item) == len(item.context) + len(item.candidates[1])


def test_grouping_lengths_only_under_group_by_length(tok):
    items = [encode_prompt(tok, Prompt("t", "Is it" + "?" * k, " No", (" Yes", " No"), 1), 64) for k in (1, 5)]
    assert grouping_lengths(items, False) is None  # the plain shuffled order
    assert grouping_lengths(items, True) == [item_length(x) for x in items]
