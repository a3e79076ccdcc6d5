"""Hugging Face Hub datasets -> the same canonical `Example`s the file readers produce.

Only used when asked for (`source="hf"` or `source="hf:<dataset id>[:<config>]"`): `datasets` is
imported lazily and needs a network (or its cache). Row converters mirror readers.py field by field.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from randmask_lab.errors import DataError, DataFormatError

from .readers import CB_LABELS, RTE_LABELS, bool_label, label_index
from .types import Example, Pools

HUB_PREFIX = "hf"
Converter = Callable[[dict[str, Any], str, int], Example | None]


@dataclass(frozen=True)
class HubSpec:
    """A Hub dataset id, its config, and which of its splits feed train and test."""

    path: str
    config: str | None
    train_split: str = "train"
    test_split: str | None = "validation"


def _sg(config: str) -> HubSpec:
    return HubSpec("aps/super_glue", config)


HUB_DEFAULTS: dict[str, HubSpec] = {
    "sst2": HubSpec("nyu-mll/glue", "sst2"), "rte": _sg("rte"), "cb": _sg("cb"),
    "boolq": _sg("boolq"), "wsc": _sg("wsc.fixed"), "wic": _sg("wic"), "multirc": _sg("multirc"),
    "copa": _sg("copa"), "record": _sg("record"), "squad": HubSpec("rajpurkar/squad", None),
    "drop": HubSpec("ucinlp/drop", None),
}


def is_hub_source(source: object) -> bool:
    """True for "hf" and "hf:<id>[:<config>]"."""
    return isinstance(source, str) and (source == HUB_PREFIX or source.startswith(HUB_PREFIX + ":"))


def parse_hub_source(task: str, source: str) -> HubSpec:
    """Resolve "hf" to the task's default dataset, or "hf:<id>[:<config>]" to that one."""
    default = HUB_DEFAULTS[task]
    rest = source[len(HUB_PREFIX) + 1:] if source != HUB_PREFIX else ""
    if not rest:
        return default
    path, _, config = rest.partition(":")
    return replace(default, path=path, config=config or None)


def _labelled(row: dict[str, Any], names: tuple[Any, ...] | None = None) -> int | None:
    """The class index, or None for unlabelled rows. Mirrors may store names or ints."""
    label = row.get("label", row.get("answer"))  # google/boolq calls it "answer"
    if label is None or label == -1:  # -1: the unlabelled test split
        return None
    return label_index(label, names, "a Hub row") if names else bool_label(label, "a Hub row")


def _simple(keys: tuple[str, ...], names: tuple[Any, ...] | None = None) -> Converter:
    def convert(row: dict[str, Any], split: str, n: int) -> Example | None:
        label = _labelled(row, names)
        if label is None:
            return None
        return Example(f"{split}:{row.get('idx', n)}", {k: row[k] for k in keys}, label=label)

    return convert


def _multirc(row: dict[str, Any], split: str, n: int) -> Example | None:
    label, idx = _labelled(row), row["idx"]
    if label is None:
        return None
    group = f"{split}:p{idx['paragraph']}:q{idx['question']}"
    fields = {k: row[k] for k in ("paragraph", "question", "answer")}
    return Example(f"{group}:a{idx['answer']}", fields, label=label, group=group)


def _record(row: dict[str, Any], split: str, n: int) -> Example | None:
    entities = tuple(dict.fromkeys(row["entities"]))
    answers = tuple(dict.fromkeys(row["answers"]))
    gold = next((i for i, e in enumerate(entities) if e in answers), None)
    if gold is None:  # unlabelled test rows
        return None
    idx = row.get("idx") or {}
    fields = {"passage": row["passage"], "query": row["query"], "entities": entities}
    return Example(f"{split}:{idx.get('passage', n)}:{idx.get('query', n)}", fields, label=gold,
                   answers=answers, group=f"{split}:{idx.get('passage', n)}")


def _squad(row: dict[str, Any], split: str, n: int) -> Example | None:
    answers = tuple(dict.fromkeys(row["answers"]["text"]))
    if not answers:
        return None
    fields = {"title": row.get("title", ""), "context": row["context"], "question": row["question"]}
    return Example(str(row.get("id", n)), fields, answers=answers)


def _drop(row: dict[str, Any], split: str, n: int) -> Example | None:
    answers = tuple(dict.fromkeys(s for s in row["answers_spans"]["spans"] if s))
    if not answers:
        return None
    fields = {"passage": row["passage"], "question": row["question"]}
    return Example(str(row.get("query_id", n)), fields, answers=answers, group=row.get("section_id"))


CONVERTERS: dict[str, Converter] = {
    "sst2": _simple(("sentence",)), "rte": _simple(("premise", "hypothesis"), RTE_LABELS),
    "cb": _simple(("premise", "hypothesis"), CB_LABELS), "boolq": _simple(("passage", "question")),
    "wic": _simple(("word", "sentence1", "sentence2")),
    "wsc": _simple(("text", "span1_text", "span2_text", "span1_index", "span2_index")),
    "copa": _simple(("premise", "choice1", "choice2", "question"), (0, 1)),
    "multirc": _multirc, "record": _record, "squad": _squad, "drop": _drop,
}


class HubUnavailableError(DataError):
    """A Hub dataset could not be loaded (no `datasets`, no network, unknown id)."""


def _import_datasets() -> Any:
    try:
        import datasets  # lazy: needed only for Hub ids
    except ImportError as e:
        raise HubUnavailableError(
            "Loading a task from the Hugging Face Hub needs the `datasets` package "
            "(pip install 'randmask[lab]') and a network connection. Without them, use the original "
            "files: data_dir= / --data-dir, the RANDMASK_DATA_DIR variable, or source=<path>."
        ) from e
    return datasets


def _load_split(datasets: Any, spec: HubSpec, split: str) -> Any:
    """One split: from a folder written by ``Dataset(Dict).save_to_disk`` when ``spec.path`` is one
    (an offline copy), else ``datasets.load_dataset`` (the Hub, or its cache)."""
    folder = Path(spec.path).expanduser()
    if folder.is_dir() and ((folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()):
        saved = datasets.load_from_disk(str(folder))
        return saved[split] if hasattr(saved, "keys") else saved
    return datasets.load_dataset(spec.path, spec.config, split=split)


def load_hub_pools(task: str, source: str) -> Pools:
    """Download (or read from cache) a Hub dataset and convert its train/test splits."""
    spec = parse_hub_source(task, source)
    datasets = _import_datasets()
    convert = CONVERTERS[task]

    def split(name: str) -> list[Example]:
        try:
            rows = _load_split(datasets, spec, name)
        except Exception as e:  # network, unknown id or config: say which and how to avoid it
            raise HubUnavailableError(
                f"Could not load {spec.path!r} (config {spec.config!r}, split {name!r}) from the "
                f"Hub for task {task!r}: {' '.join(str(e).split())[:300]}. Use local files instead "
                "(--data-dir / data_dir=, RANDMASK_DATA_DIR, or source=<path>), or connect to a network."
            ) from e
        try:
            out = [convert(dict(r), name, n) for n, r in enumerate(rows)]
        except KeyError as e:
            raise DataFormatError(f"{spec.path} rows lack field {e} expected for task {task!r}") from e
        return [x for x in out if x is not None]

    test = split(spec.test_split) if spec.test_split else None
    origin = f"hf:{spec.path}:{spec.config or ''}"
    return Pools(split(spec.train_split), test, origin=origin, train_origin=f"{origin} split {spec.train_split}",
                 test_origin=f"{origin} split {spec.test_split}" if spec.test_split else None)
