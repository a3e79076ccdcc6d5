"""Classification-head (encoder) renderings: (text_a, text_b, label) and num_labels."""

from __future__ import annotations

import pytest

from randmask_lab.tasks import TASK_NAMES, Example, get_task

HEAD_TASKS = ("sst2", "rte", "cb", "boolq", "wsc", "wic", "multirc")


def test_which_tasks_have_heads():
    assert {n for n in TASK_NAMES if get_task(n).has_head_mode} == set(HEAD_TASKS)
    assert get_task("cb").num_labels == 3 and get_task("rte").num_labels == 2
    assert get_task("cb").label_names == ("entailment", "contradiction", "neutral")
    assert get_task("squad").label_names == () and get_task("squad").num_labels is None


def test_pairs(pools):
    assert get_task("sst2").render_pair(pools("sst2").test[0])[:3] == (
        "it 's a charming and often affecting journey .", None, 1)
    rte = get_task("rte").render_pair(pools("rte").test[0])
    assert rte.text_b == "Christopher Reeve had an accident." and rte.label == 1
    wic = get_task("wic").render_pair(pools("wic").test[0])
    assert wic.text_a == "class: An emerging professional class." and wic.label == 0
    wsc = get_task("wsc").render_pair(pools("wsc").train[0])
    assert wsc.text_b == 'Does the pronoun "He" refer to Mark?'
    ex = Example("m", {"paragraph": "P", "question": "Q?", "answer": "A"}, label=1)
    assert get_task("multirc").render_pair(ex)[:3] == ("Q? A", "P", 1)
    ex = Example("b", {"passage": "P", "question": "q"}, label=0)
    assert get_task("boolq").render_pair(ex)[:3] == ("q", "P", 0)


@pytest.mark.parametrize("name", HEAD_TASKS)
def test_labels_fit_num_labels(pools, name):
    task = get_task(name)
    for ex in pools(name).train[:200]:
        assert 0 <= task.render_pair(ex).label < task.num_labels


def test_no_head_mode_is_a_clear_error():
    with pytest.raises(ValueError, match="no classification-head mode"):
        get_task("squad").render_pair(Example("x", {}, answers=("a",)))
