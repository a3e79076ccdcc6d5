"""Every loader on the real files: row counts, label sets, field names, ids."""

from __future__ import annotations

from collections import Counter

import pytest

# task: (train rows, test rows or None when only one original split exists)
COUNTS = {
    "sst2": (60614, 872), "rte": (2490, 277), "cb": (250, 56), "boolq": (3270, None),
    "wsc": (554, 104), "wic": (5428, 638), "multirc": (27243, 4848), "copa": (400, 100),
    "record": (32, 32), "squad": (11877, 4961 + 5609), "drop": (3419, None),
}
LABELS = {"sst2": {0, 1}, "rte": {0, 1}, "cb": {0, 1, 2}, "boolq": {0, 1}, "wsc": {0, 1},
          "wic": {0, 1}, "multirc": {0, 1}, "copa": {0, 1}}


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_row_counts_and_unique_ids(pools, name):
    p = pools(name)
    n_train, n_test = COUNTS[name]
    assert len(p.train) == n_train
    assert (p.test is None) == (n_test is None)
    if p.test is not None:
        assert len(p.test) == n_test
    for split in (p.train, p.test or []):
        assert len({e.uid for e in split}) == len(split)


@pytest.mark.parametrize("name", sorted(LABELS))
def test_label_sets(pools, name):
    p = pools(name)
    for split in (p.train, p.test):
        if split is not None:
            assert {e.label for e in split} == LABELS[name]


def test_label_mappings_match_the_files(pools):
    # CB train: 115 entailment, 119 contradiction, 16 neutral; RTE val: 146 / 131.
    assert Counter(e.label for e in pools("cb").train) == {0: 115, 1: 119, 2: 16}
    assert Counter(e.label for e in pools("rte").test) == {0: 146, 1: 131}
    assert Counter(e.label for e in pools("boolq").train) == {1: 2033, 0: 1237}


def test_multirc_nesting_and_groups(pools):
    p = pools("multirc")
    first = p.train[0]
    assert first.uid == "train:p0:q0:a0" and first.group == "train:p0:q0"
    assert first.fields["question"] == "What did the high-level effort to persuade Pakistan include?"
    assert first.fields["answer"] == "Children, Gerd, or Dorian Popa" and first.label == 0
    assert len({e.group for e in p.train}) == 5131  # questions
    assert len({e.group for e in p.test}) == 953


def test_record_entities_and_answers(pools):
    ex = pools("record").train[0]
    assert ex.fields["entities"][:3] == ("Hamish Mackay", "Diego Costa", "Kurt Zouma")
    assert ex.answers == ("Olimpija Ljubljana",)
    assert ex.fields["entities"][ex.label] == "Olimpija Ljubljana"
    assert "@placeholder" in ex.fields["query"]


def test_squad_keeps_all_gold_answers(pools):
    ex = pools("squad").test[0]
    assert ex.uid == "56be4db0acb8001400a502ec"
    assert ex.fields["title"] == "Super_Bowl_50"
    assert ex.answers == ("Denver Broncos",)  # three identical golds, deduplicated
    assert all(e.answers for e in pools("squad").train)


def test_drop_answer_forms(pools):
    p = pools("drop")
    by_id = {e.uid: e for e in p.train}
    assert by_id["f16c0ee7-f131-4a8b-a6ac-4d275ea68066"].answers[0] == "3"  # number
    assert by_id["f703d43d-73fa-4fda-8913-d81bd5569700"].answers[0] == "28-yard"  # span
    assert len({e.group for e in p.train}) == 217  # passages


def test_drop_date_and_multispan_strings():
    from randmask_lab.tasks.readers import drop_answer_strings

    date = {"number": "", "date": {"day": "5", "month": "July", "year": "1990"}, "spans": []}
    assert drop_answer_strings(date) == ["5 July 1990"]
    year = {"number": "", "date": {"day": "", "month": "", "year": "1990"}, "spans": []}
    assert drop_answer_strings(year) == ["1990"]
    spans = {"number": "", "date": {"day": "", "month": "", "year": ""}, "spans": ["a", "b"]}
    assert drop_answer_strings(spans) == ["a", "b"]


def test_sst2_reads_tsv_fields(pools):
    ex = pools("sst2").test[0]
    assert ex.uid == "test:0" and ex.label == 1
    assert ex.fields["sentence"] == "it 's a charming and often affecting journey . "


def test_data_files_are_read_through_the_bounded_reader(tmp_path):
    """Issue 28: a task data file that is a FIFO or a device is a DataFormatError, never a blocked read."""
    from tests.hostile import hang_guard, replace_with_dev_zero, replace_with_fifo

    from randmask_lab.errors import DataFormatError
    from randmask_lab.experiment.run.sources import file_fingerprint
    from randmask_lab.tasks.readers import _json, text_lines

    for replace in (replace_with_fifo, replace_with_dev_zero):
        path = replace(tmp_path / "train.jsonl")
        for read in (lambda p: list(text_lines(p)), _json, file_fingerprint):
            with hang_guard(30), pytest.raises(DataFormatError, match="not a regular file"):
                read(path)
