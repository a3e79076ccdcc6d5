"""Causal-LM scoring: mean candidate log-probs, positions-only logits == full logits, generation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from randmask_lab.experiment.parts.data import LMItem
from randmask_lab.experiment.parts.lm import (
    LMObjective,
    Span,
    candidate_requests,
    candidate_scores,
    span_logprobs,
    target_scores,
)
from randmask_lab.methods import prepare_method
from randmask_lab.tasks import get_task


@pytest.fixture(scope="module")
def lm(tiny_lm):
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
    return model, tf.AutoTokenizer.from_pretrained(tiny_lm)


def _items() -> list[LMItem]:
    g = torch.Generator().manual_seed(0)
    rand = lambda n: tuple(torch.randint(3, 200, (n,), generator=g).tolist())
    return [
        LMItem(rand(7), (rand(1), rand(1)), rand(1), 1, ()),  # one-token candidates: one pass
        LMItem(rand(12), (rand(3), rand(1), rand(2)), rand(3), 0, ()),  # mixed lengths
        LMItem(rand(4), (rand(5), rand(2)), rand(2), 1, ()),
    ]


def _reference_mean_logprob(model, context, continuation) -> float:
    """Mean log p(continuation tokens | context) from one unpadded full forward pass."""
    ids = torch.tensor([list(context) + list(continuation)])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)  # (T, V)
    start = len(context)
    return float(torch.stack([logp[start - 1 + j, t] for j, t in enumerate(continuation)]).mean())


def test_candidate_scores_are_mean_token_logprobs(lm):
    model, _ = lm
    items = _items()
    with torch.no_grad():
        scores = candidate_scores(model, items, pad_id=0)
    for b, item in enumerate(items):
        for k, cand in enumerate(item.candidates):
            assert scores[b, k].item() == pytest.approx(_reference_mean_logprob(model, item.context, cand), abs=1e-5)
    assert scores[0, 2].item() == float("-inf")  # padding of the 2-candidate item


def test_positions_only_equals_full_logits(lm):
    model, _ = lm
    items = _items()
    with torch.no_grad():
        fast, full = (candidate_scores(model, items, 0, positions_only=p) for p in (True, False))
        t_fast, t_full = (target_scores(model, items, 0, positions_only=p) for p in (True, False))
    torch.testing.assert_close(fast, full, rtol=0, atol=1e-5)
    torch.testing.assert_close(t_fast, t_full, rtol=0, atol=1e-5)


def test_positions_only_gradients_match_full_logits(tiny_lm):
    import transformers as tf

    grads = []
    for positions_only in (True, False):
        model = tf.AutoModelForCausalLM.from_pretrained(tiny_lm)
        prepared = prepare_method("randmask", model, ratio=0.05, seed=0)
        loss = -candidate_scores(prepared.model, _items(), 0, positions_only).clamp(min=-1e4).sum()
        loss.backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in prepared.trainable_parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_one_token_candidates_share_one_sequence():
    item = LMItem((5, 6, 7), ((8,), (9,), (10, 11)), (8,), 0, ())
    seqs, spans, owners = candidate_requests([item])
    assert seqs == [(5, 6, 7, 10, 11)]  # the two-token candidate's sequence carries the others
    assert sorted(owners) == [(0, 0), (0, 1), (0, 2)]
    assert all(s.start == 3 for s in spans)
    seqs, _, _ = candidate_requests([LMItem((5, 6), ((8,), (9,)), (8,), 0, ())])
    assert seqs == [(5, 6)]  # only one-token candidates: the bare context


def test_span_outside_sequence_is_an_error(lm):
    model, _ = lm
    with pytest.raises(ValueError, match="prefix and continuation"):
        span_logprobs(model, [(1, 2, 3)], [Span(0, 0, (4,))], 0)


def test_losses_follow_the_task(lm):
    model, tok = lm
    items = _items()
    cls = LMObjective(get_task("rte"), tok, 0)  # candidates CE
    gen = LMObjective(get_task("squad"), tok, 0)  # LM loss on the target
    with torch.no_grad():
        scores = candidate_scores(model, items, 0)
        expected = F.cross_entropy(scores, torch.tensor([x.gold for x in items]))
        assert cls.loss(model, items).item() == pytest.approx(expected.item(), abs=1e-5)
        assert gen.loss(model, items).item() == pytest.approx(-target_scores(model, items, 0).mean().item(), abs=1e-5)
        losses, preds = cls.evaluate(model, items, with_metric=True)
    assert preds == scores.argmax(1).tolist()
    assert sum(losses) / len(losses) == pytest.approx(expected.item(), abs=1e-5)


def test_generation_is_greedy_and_stops_at_newline(lm):
    model, tok = lm
    objective = LMObjective(get_task("squad"), tok, tok.pad_token_id, max_new_tokens=6)
    contexts = [tuple(tok("Question: the cat? Answer:")["input_ids"]), tuple(tok("A man")["input_ids"])]
    answers = objective.generate(model, contexts)
    assert len(answers) == 2 and all("\n" not in a for a in answers)
    assert answers == objective.generate(model, contexts)  # deterministic
    # Batched (left-padded) decoding gives what each context gives alone.
    assert answers[1] == objective.generate(model, contexts[1:])[0]


def test_record_accuracy_credits_any_gold_alias(lm):
    """ReCoRD's answer "Benazir Bhutto" is also "Bhutto": the runner counted only the first entity right, so
    picking the other alias scored 0 (MeZO and the paper's code take any gold). Every other task keeps one gold."""
    from randmask_lab.experiment.parts.data import encode_prompt
    from randmask_lab.tasks import Example

    _, tok = lm
    example = Example("r0", {"passage": "Benazir Bhutto spoke.\n@highlight\nBhutto won", "query": "@placeholder won",
                             "entities": ["Benazir Bhutto", "Bhutto", "Zardari"]}, 0, ("Benazir Bhutto", "Bhutto"))
    item = encode_prompt(tok, get_task("record").render(example), 256)
    assert item.gold == 0 and item.right == (0, 1)
    objective = LMObjective(get_task("record"), tok, 0)
    assert [objective.metric([p], [item]) for p in (0, 1, 2)] == [1.0, 1.0, 0.0]
    assert LMObjective(get_task("rte"), tok, 0).metric([1, 0], _items()[:2]) == 1.0  # no `right`: the gold alone
