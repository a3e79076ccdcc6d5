"""Classification-head renderings for encoders (BERT / MiniLM + a sequence-classification head).

Each example becomes `(text_a, text_b or None, label)` for a standard pair encoding
(`[CLS] a [SEP] b [SEP]`); labels keep the task's class order (see readers.py).
"""

from __future__ import annotations

from collections.abc import Callable

from .readers import CB_LABELS, RTE_LABELS
from .types import Example, PairExample

_BOOL = ("false", "true")
LABEL_NAMES: dict[str, tuple[str, ...]] = {  # class index -> name (for id2label)
    "sst2": ("negative", "positive"), "rte": RTE_LABELS, "cb": CB_LABELS, "boolq": _BOOL,
    "wsc": _BOOL, "wic": _BOOL, "multirc": _BOOL,
}
NUM_LABELS: dict[str, int] = {name: len(names) for name, names in LABEL_NAMES.items()}


def _pair(ex: Example, a: str, b: str | None) -> PairExample:
    if ex.label is None:
        raise ValueError(f"example {ex.uid} has no label")
    return PairExample(a, b, ex.label, ex.uid)


def _sst2(ex: Example) -> PairExample:
    return _pair(ex, ex.fields["sentence"].strip(), None)


def _nli(ex: Example) -> PairExample:
    return _pair(ex, ex.fields["premise"], ex.fields["hypothesis"])


def _boolq(ex: Example) -> PairExample:
    # Question first, as in BERT's BoolQ setup: truncation then cuts the passage, not the question.
    return _pair(ex, ex.fields["question"], ex.fields["passage"])


def _wic(ex: Example) -> PairExample:
    f = ex.fields
    # The target word leads so the encoder knows which word's senses to compare.
    return _pair(ex, f"{f['word']}: {f['sentence1']}", f["sentence2"])


def _wsc(ex: Example) -> PairExample:
    f = ex.fields
    return _pair(ex, f["text"], f"Does the pronoun \"{f['span2_text']}\" refer to {f['span1_text']}?")


def _multirc(ex: Example) -> PairExample:
    f = ex.fields
    # Question + candidate answer first, passage second (truncated first when too long).
    return _pair(ex, f"{f['question']} {f['answer']}", f["paragraph"])


PAIR_RENDERERS: dict[str, Callable[[Example], PairExample]] = {
    "sst2": _sst2, "rte": _nli, "cb": _nli, "boolq": _boolq, "wsc": _wsc, "wic": _wic,
    "multirc": _multirc,
}
