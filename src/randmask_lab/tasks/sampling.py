"""The paper's data protocol (Section 4.1, after MeZO): seeded train / val / test samples.

From the original train split: `n_train` train and `n_val` validation examples, disjoint. From the
original validation split: up to `n_test` test examples. Where a split is too small for the
request, the sizes shrink proportionally so all of it is used (CB 250 -> 167 train + 83 val).
Where no test source exists (BoolQ here, DROP here) all three splits are carved, disjoint, out of
the one pool, again proportionally when it is too small.

Rows that share a `group` (a MultiRC question, a DROP passage) always land in the same split: groups
are shuffled and taken whole; the last group a split needs is cut to hit the exact size and the
cut-off rows are dropped (never handed to the next split), so sizes are exact and groups disjoint.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from .types import Example


def fit_sizes(requested: Sequence[int], available: int) -> list[int]:
    """The requested sizes if they fit in `available`, else proportional shares that sum to it.

    Shares are floored and the remainder goes to the largest fractional parts (ties: earlier
    split first), so the result is deterministic and uses every row.
    """
    if any(r < 0 for r in requested):
        raise ValueError(f"split sizes must be >= 0, got {list(requested)}")
    total = sum(requested)
    if total <= available:
        return list(requested)
    exact = [available * r / total for r in requested]
    sizes = [int(x) for x in exact]
    order = sorted(range(len(exact)), key=lambda i: (-(exact[i] - sizes[i]), i))
    for i in order[: available - sum(sizes)]:
        sizes[i] += 1
    return sizes


def _shuffled_groups(pool: Sequence[Example], rng: random.Random) -> list[list[Example]]:
    """Group rows (ungrouped rows are singletons), shuffle group order and rows within groups."""
    groups: dict[str, list[Example]] = {}
    for i, ex in enumerate(pool):
        key = ex.group if ex.group is not None else f"\0{i}"  # \0 cannot clash with a real group
        groups.setdefault(key, []).append(ex)
    out = list(groups.values())
    rng.shuffle(out)
    for rows in out:
        if len(rows) > 1:
            rng.shuffle(rows)
    return out


def take_disjoint(pool: Sequence[Example], sizes: Sequence[int], rng: random.Random) -> list[list[Example]]:
    """Consecutive, group-disjoint samples of the given sizes from a seeded shuffle of `pool`."""
    groups = _shuffled_groups(pool, rng)
    splits: list[list[Example]] = []
    g = 0
    for size in sizes:
        split: list[Example] = []
        while len(split) < size and g < len(groups):
            split.extend(groups[g][: size - len(split)])  # cut the last group; its rest is dropped
            g += 1
        splits.append(split)
    return splits


def protocol_split(
    train_pool: Sequence[Example],
    test_pool: Sequence[Example] | None,
    *,
    data_seed: int,
    n_train: int = 1000,
    n_val: int = 500,
    n_test: int = 1000,
    salt: str = "",
) -> tuple[list[Example], list[Example], list[Example], list[str]]:
    """Sample `(train, val, test, notes)`; `notes` say where sizes were adapted.

    `salt` (the task name) makes tasks draw independent permutations from the same seed.
    """
    notes: list[str] = []

    def sizes_for(requested: list[int], pool: Sequence[Example], what: str) -> list[int]:
        sizes = fit_sizes(requested, len(pool))
        if sizes != requested:
            notes.append(f"{what} has {len(pool)} rows < {sum(requested)} requested: sizes {sizes}")
        return sizes

    if test_pool is None:
        sizes = sizes_for([n_train, n_val, n_test], train_pool, "the only split (carved 3 ways)")
        train, val, test = take_disjoint(train_pool, sizes, random.Random(f"{salt}:{data_seed}:all"))
    else:
        sizes = sizes_for([n_train, n_val], train_pool, "the train split")
        train, val = take_disjoint(train_pool, sizes, random.Random(f"{salt}:{data_seed}:train"))
        (n_test_fit,) = sizes_for([n_test], test_pool, "the test source")
        (test,) = take_disjoint(test_pool, [n_test_fit], random.Random(f"{salt}:{data_seed}:test"))
    for name, split, want in (("train", train, sizes[0]), ("val", val, sizes[1])):
        if len(split) < want:  # only possible when cut groups ate into a tight pool
            notes.append(f"{name}: {len(split)} rows (groups kept whole used up the pool)")
    return train, val, test, notes
