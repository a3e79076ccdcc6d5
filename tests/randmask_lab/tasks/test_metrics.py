"""Metrics on hand-made cases: SQuAD normalisation, F1 max over golds, exact match, accuracy."""

from __future__ import annotations

import pytest

from randmask_lab.tasks import accuracy, accuracy_any, exact_match, get_task, mean_f1, normalize_answer, squad_f1
from randmask_lab.tasks.types import Prompt


def test_normalize_answer():
    assert normalize_answer("The  Denver Broncos!") == "denver broncos"
    assert normalize_answer("an apple, a pear") == "apple pear"
    assert normalize_answer("theatre") == "theatre"  # only whole-word articles go
    assert normalize_answer("  \tA\nB  ") == "b"


def test_f1_ignores_case_punctuation_articles():
    assert squad_f1("the Denver Broncos.", "Denver Broncos") == 1.0
    assert squad_f1("An apple", "apple") == 1.0


def test_f1_partial_overlap():
    # pred {denver, broncos, team}, gold {denver, broncos}: P = 2/3, R = 1 -> F1 = 0.8
    assert squad_f1("Denver Broncos team", "Denver Broncos") == pytest.approx(0.8)
    assert squad_f1("Carolina", "Denver Broncos") == 0.0


def test_f1_counts_repeated_tokens_once_each():
    # pred [go, go, go] vs gold [go]: 1 shared token, P = 1/3, R = 1
    assert squad_f1("go go go", "go") == pytest.approx(2 * (1 / 3) * 1 / (1 / 3 + 1))


def test_f1_max_over_golds():
    assert squad_f1("Broncos", ["Carolina Panthers", "the Broncos"]) == 1.0
    assert squad_f1("Denver", ("Denver Broncos", "Denver Broncos team")) == pytest.approx(2 / 3)


def test_empty_answers():
    assert squad_f1("", "") == 1.0
    assert squad_f1("the", "Broncos") == 0.0  # normalises to empty
    with pytest.raises(ValueError, match="at least one gold"):
        squad_f1("x", [])


def test_exact_match():
    assert exact_match("The Broncos!", ["broncos"]) == 1.0
    assert exact_match("Denver Broncos", "Broncos") == 0.0


def test_accuracy():
    assert accuracy([0, 1, 1, 2], [0, 1, 0, 2]) == 0.75
    assert accuracy([], []) == 0.0
    with pytest.raises(ValueError):
        accuracy([0], [0, 1])


def test_accuracy_any():
    assert accuracy_any([0, 2, 1], [(0,), (1, 2), (0, 2)]) == pytest.approx(2 / 3)
    assert accuracy_any([], []) == 0.0
    with pytest.raises(ValueError):
        accuracy_any([0], [(0,), (1,)])


def test_task_score_uses_its_metric():
    prompts = [Prompt("a", "t", "x", ("x", "y"), 0), Prompt("b", "t", "y", ("x", "y"), 1)]
    assert get_task("rte").score([0, 0], prompts) == 0.5
    gen = [Prompt("a", "t", " Ann\n", answers=("Ann",)), Prompt("b", "t", " 3\n", answers=("3", "three"))]
    assert get_task("squad").score(["ann", "four"], gen) == 0.5
    assert mean_f1(["three"], [("3", "three")]) == 1.0
