"""Metrics: accuracy (one right answer, or any of several), and SQuAD-style exact match and token F1 (max over
gold answers). Pure Python."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def accuracy(predictions: Sequence[int], golds: Sequence[int]) -> float:
    """Fraction of `predictions` equal to `golds` (0.0 for no examples): ``accuracy_any`` with one right answer."""
    return accuracy_any(predictions, [(g,) for g in golds])


def accuracy_any(predictions: Sequence[int], rights: Sequence[Sequence[int]]) -> float:
    """Fraction of `predictions` found in their item's right answers `rights` (0.0 for no examples)."""
    if len(predictions) != len(rights):
        raise ValueError(f"{len(predictions)} predictions for {len(rights)} sets of right answers")
    if not rights:
        return 0.0
    return sum(int(p in r) for p, r in zip(predictions, rights, strict=True)) / len(rights)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower-case, drop punctuation, drop a/an/the, collapse whitespace."""
    text = text.lower().translate(_PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _token_f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:  # an empty answer matches only an empty answer (SQuAD v2 rule)
        return float(pred == ref)
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def _as_golds(golds: str | Sequence[str]) -> Sequence[str]:
    golds = [golds] if isinstance(golds, str) else golds
    if not golds:
        raise ValueError("need at least one gold answer")
    return golds


def squad_f1(prediction: str, golds: str | Sequence[str]) -> float:
    """Token F1 of `prediction` against the best-matching gold answer, after normalisation."""
    return max(_token_f1(prediction, g) for g in _as_golds(golds))


def exact_match(prediction: str, golds: str | Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised gold answer, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(g) for g in _as_golds(golds)))


def mean_f1(predictions: Sequence[str], golds: Sequence[Sequence[str]]) -> float:
    """Mean over examples of `squad_f1` (0.0 for no examples)."""
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions for {len(golds)} gold answer lists")
    if not golds:
        return 0.0
    return sum(squad_f1(p, g) for p, g in zip(predictions, golds, strict=True)) / len(golds)
