"""Plain data records shared by the task layer: one loaded example and its rendered forms."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

Kind = Literal["classification", "multiple_choice", "generation"]
Loss = Literal["candidates", "lm"]
Metric = Literal["accuracy", "f1"]


@dataclass(frozen=True)
class Example:
    """One example in a task's canonical fields, whatever format it was read from.

    `label` is the class index (classification), the gold candidate index (multiple choice) or None
    (generation). `answers` holds gold strings (generation; ReCoRD's answer entities). `group` keeps
    rows that must not be split apart (a MultiRC question, a DROP passage) together when sampling.
    """

    uid: str
    fields: dict[str, Any]
    label: int | None = None
    answers: tuple[str, ...] = ()
    group: str | None = None


@dataclass(frozen=True)
class Prompt:
    """A causal-LM rendering: `text` is the context; `text + target` is the gold full sequence.

    Classification / multiple choice: score each of `candidates` as a continuation of `text`;
    `gold` indexes the right one and `target == candidates[gold]` (the one trained on; `golds` lists
    every right one where several are). Generation: `candidates` is
    empty, `answers` lists every gold answer (for F1), and `target` is the first answer as the
    model should emit it (leading space, trailing "\\n" so a model learns where to stop).
    """

    uid: str
    text: str
    target: str
    candidates: tuple[str, ...] = ()
    gold: int | None = None
    answers: tuple[str, ...] = ()
    golds: tuple[int, ...] = ()
    """Every right candidate where more than one is (ReCoRD: each entity that is a gold answer, as MeZO
    scores it); () means `gold` alone."""

    @property
    def right(self) -> tuple[int, ...]:
        """The candidate indices accuracy counts as right: `golds`, else `(gold,)`."""
        return self.golds or (() if self.gold is None else (self.gold,))


class PairExample(NamedTuple):
    """A classification-head rendering for encoders: `(text_a, text_b or None, label)`.

    A tuple so `text_a, text_b, label = pair[:3]` works; `uid` rides along last.
    """

    text_a: str
    text_b: str | None
    label: int
    uid: str = ""


@dataclass(frozen=True)
class Pools:
    """The loaded original splits before sampling. `test is None`: carve every split from `train`."""

    train: list[Example]
    test: list[Example] | None
    origin: str = ""  # where the data came from, for logs and result records
    train_origin: str = ""  # the files (or Hub split) of `train`
    test_origin: str | None = None  # the files of `test`; None when it is absent


@dataclass(frozen=True)
class TaskSplits:
    """The protocol's sampled splits for one task and one data seed."""

    task: str
    data_seed: int
    train: tuple[Example, ...]
    val: tuple[Example, ...]
    test: tuple[Example, ...]
    origin: str = ""
    notes: tuple[str, ...] = field(default=())  # how the sampler adapted to small/missing splits
