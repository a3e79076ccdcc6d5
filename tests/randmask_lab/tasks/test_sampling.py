"""The protocol sampler: sizes, determinism, disjointness, groups kept whole."""

from __future__ import annotations

import random

import pytest

from randmask_lab.tasks import Example, fit_sizes, get_task, protocol_split
from randmask_lab.tasks.sampling import take_disjoint


def _ids(split):
    return [e.uid for e in split]


def _splits(pools, name, seed, **sizes):
    p = pools(name)
    train, val, test, notes = protocol_split(p.train, p.test, data_seed=seed, salt=name, **sizes)
    return train, val, test, notes


def test_fit_sizes():
    assert fit_sizes([1000, 500], 5000) == [1000, 500]
    assert fit_sizes([1000, 500], 250) == [167, 83]  # CB
    assert fit_sizes([1000, 500], 400) == [267, 133]  # COPA
    assert fit_sizes([1000, 500, 1000], 100) == [40, 20, 40]
    assert sum(fit_sizes([3, 3, 3], 7)) == 7
    with pytest.raises(ValueError, match=">= 0"):
        fit_sizes([-1], 5)


@pytest.mark.parametrize("name", ["rte", "sst2", "multirc", "boolq", "drop"])
def test_same_seed_same_ids_other_seed_different(pools, name):
    a = _splits(pools, name, 0)
    b = _splits(pools, name, 0)
    c = _splits(pools, name, 1)
    for x, y in zip(a[:3], b[:3], strict=True):
        assert _ids(x) == _ids(y)
    assert _ids(a[0]) != _ids(c[0]) and _ids(a[1]) != _ids(c[1])


@pytest.mark.parametrize("name", ["rte", "sst2", "multirc", "squad", "cb"])
def test_paper_sizes_and_disjoint_train_val(pools, name):
    train, val, test, _ = _splits(pools, name, 3)
    p = pools(name)
    assert [len(train), len(val)] == fit_sizes([1000, 500], len(p.train))
    assert len(test) == min(1000, len(p.test))
    assert not set(_ids(train)) & set(_ids(val))


def test_small_train_split_shared_proportionally(pools):
    for name, want in {"cb": (167, 83), "copa": (267, 133), "wsc": (369, 185), "record": (21, 11)}.items():
        train, val, test, notes = _splits(pools, name, 0)
        assert (len(train), len(val)) == want
        assert len(test) == len(pools(name).test)  # whole validation split as test
        assert "the train split has" in notes[0]


@pytest.mark.parametrize("name", ["boolq", "drop"])
def test_single_source_carved_three_ways_disjoint(pools, name):
    train, val, test, _ = _splits(pools, name, 0)
    assert (len(train), len(val), len(test)) == (1000, 500, 1000)
    ids = [set(_ids(s)) for s in (train, val, test)]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])


@pytest.mark.parametrize("name", ["drop", "multirc"])
def test_groups_never_straddle_splits(pools, name):
    train, val, test, _ = _splits(pools, name, 5)
    groups = [{e.group for e in s} for s in (train, val, test)]
    assert not groups[0] & groups[1]
    if pools(name).test is None:  # test carved from the same pool
        assert not (groups[0] & groups[2] or groups[1] & groups[2])


def test_sizes_are_parameters(pools):
    train, val, test, _ = _splits(pools, "multirc", 0, n_train=16, n_val=8, n_test=4)
    assert (len(train), len(val), len(test)) == (16, 8, 4)


def test_take_disjoint_cuts_last_group_and_drops_rest():
    pool = [Example(f"{g}-{i}", {}, group=str(g)) for g in range(3) for i in range(4)]
    a, b = take_disjoint(pool, [6, 4], random.Random(0))
    assert len(a) == 6 and len(b) == 4
    assert not {e.group for e in a} & {e.group for e in b}


def test_tasks_draw_independent_permutations(pools):
    # Same seed, different task salt: RTE and a renamed copy sample different rows.
    p = pools("rte")
    a = protocol_split(p.train, p.test, data_seed=0, n_train=50, n_val=10, salt="rte")[0]
    b = protocol_split(p.train, p.test, data_seed=0, n_train=50, n_val=10, salt="other")[0]
    assert _ids(a) != _ids(b)


def test_load_task_splits_records_origin(pools):
    s = get_task("cb").splits(0, n_train=8, n_val=4, n_test=4)
    assert s.task == "cb" and s.data_seed == 0
    assert (len(s.train), len(s.val), len(s.test)) == (8, 4, 4)
    assert "train.jsonl" in s.origin and "val.jsonl" in s.origin
