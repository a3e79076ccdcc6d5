"""Parsers for each task's original file format -> a list of canonical `Example`s.

Canonical fields and label orders follow the Hugging Face `super_glue` / `glue` encodings so the
Hub path (hub.py) and these parsers produce identical examples:
  rte: 0 entailment, 1 not_entailment;  cb: 0 entailment, 1 contradiction, 2 neutral;
  boolq / wic / wsc / multirc: 0 False, 1 True;  sst2: 0 negative, 1 positive;  copa: choice index.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from randmask import open_limited, read_limited
from randmask_lab.errors import DataFormatError

from .types import Example

MAX_DATA_BYTES = 8 << 30  # the largest original file of the paper's tasks is ~100 MB (ReCoRD)
RTE_LABELS = ("entailment", "not_entailment")
CB_LABELS = ("entailment", "contradiction", "neutral")


def text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) of a UTF-8 text file; bytes that are not UTF-8 are a
    DataFormatError naming the file and the line."""
    with open_limited(path, MAX_DATA_BYTES, "task data file", error=DataFormatError) as (f, _):
        for n, raw in enumerate(f, 1):
            try:
                yield n, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataFormatError(f"{path}:{n}: not UTF-8 text ({e.reason} at byte {e.start} of the line)"
                                      ) from None


def _jsonl(path: Path) -> Iterator[dict[str, Any]]:
    for n, line in text_lines(path):
        if line.strip():
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{path}:{n}: not a JSON line ({e})") from e


def _json(path: Path) -> Any:
    data = read_limited(path, MAX_DATA_BYTES, "task data file", error=DataFormatError)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataFormatError(f"{path}:{line}: not UTF-8 text ({e.reason})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def label_index(value: Any, names: tuple[Any, ...], path: object) -> int:
    """Map a label name (or an int already in range) to its class index; `path` is for errors."""
    if isinstance(value, str) and value in names:
        return names.index(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(names):
        return value
    raise DataFormatError(f"{path}: label {value!r} is not one of {names}")


def bool_label(value: Any, path: object) -> int:
    """Map a true/false label (bool or 0/1) to 0/1; `path` is for errors."""
    if isinstance(value, bool) or value in (0, 1):
        return int(value)
    raise DataFormatError(f"{path}: expected a true/false label, got {value!r}")


def _uid(path: Path, row: dict[str, Any], n: int) -> str:
    """`<file stem>:<idx>`, falling back to the row number when a row has no `idx`."""
    return f"{path.stem}:{row.get('idx', n)}"


def _field(row: dict[str, Any], key: str, path: Path) -> Any:
    try:
        return row[key]
    except KeyError:
        raise DataFormatError(f"{path}: a row lacks field {key!r} (has {sorted(row)})") from None


def read_sst2(path: Path) -> list[Example]:
    """GLUE TSV with a header naming `sentence` and `label` columns (60k rows: plain split, no csv)."""
    lines = text_lines(path)
    first = next(lines, None)
    if first is None:
        return []  # an empty file: the loader names it
    header = first[1].rstrip("\r\n").split("\t")
    if "sentence" not in header or "label" not in header:
        raise DataFormatError(f"{path}:1: header {header} lacks 'sentence' and 'label' columns")
    i_s, i_l = header.index("sentence"), header.index("label")
    stem, out = path.stem, []
    for n, line in lines:
        cols = line.rstrip("\r\n").split("\t")
        if len(cols) != len(header):
            if not line.strip():
                continue
            raise DataFormatError(f"{path}:{n}: expected {len(header)} tab-separated columns")
        if cols[i_l] not in ("0", "1"):
            raise DataFormatError(f"{path}:{n}: label {cols[i_l]!r} is not 0 or 1")
        # uid: the 0-based data row, as GLUE's `idx`
        out.append(Example(f"{stem}:{len(out)}", {"sentence": cols[i_s]}, label=int(cols[i_l])))
    return out


def sst2_labelled(path: Path) -> bool:
    """True unless `path` is a TSV whose header has no `label` column (GLUE's own test.tsv)."""
    if path.suffix != ".tsv":
        return True
    first = next(text_lines(path), None)
    return first is not None and "label" in first[1].rstrip("\r\n").split("\t")


def _flat(path: Path, keys: tuple[str, ...], label: Callable[[Any], int]) -> list[Example]:
    """Flat SuperGLUE jsonl: one example per row with `keys` copied and `label` mapped."""
    return [
        Example(_uid(path, r, n), {k: _field(r, k, path) for k in keys},
                label=label(_field(r, "label", path)))
        for n, r in enumerate(_jsonl(path))
    ]


def read_rte(path: Path) -> list[Example]:
    return _flat(path, ("premise", "hypothesis"), lambda v: label_index(v, RTE_LABELS, path))


def read_cb(path: Path) -> list[Example]:
    return _flat(path, ("premise", "hypothesis"), lambda v: label_index(v, CB_LABELS, path))


def read_boolq(path: Path) -> list[Example]:
    return _flat(path, ("passage", "question"), lambda v: bool_label(v, path))


def read_wic(path: Path) -> list[Example]:
    return _flat(path, ("word", "sentence1", "sentence2"), lambda v: bool_label(v, path))


def read_copa(path: Path) -> list[Example]:
    out = _flat(path, ("premise", "choice1", "choice2", "question"), lambda v: label_index(v, (0, 1), path))
    for ex in out:
        if ex.fields["question"] not in ("cause", "effect"):
            raise DataFormatError(f"{path}: COPA row {ex.uid} asks {ex.fields['question']!r}, "
                                  "not 'cause' or 'effect'")
    return out


def read_wsc(path: Path) -> list[Example]:
    """SuperGLUE WSC: the spans sit under `target` (HF flattens them to the top level)."""
    out = []
    for n, r in enumerate(_jsonl(path)):
        t = _field(r, "target", path)
        fields = {"text": _field(r, "text", path)}
        fields.update({k: _field(t, k, path) for k in ("span1_text", "span2_text", "span1_index",
                                                        "span2_index")})
        out.append(Example(_uid(path, r, n), fields, label=bool_label(_field(r, "label", path), path)))
    return out


def read_multirc(path: Path) -> list[Example]:
    """One example per answer row (passage -> questions -> answers); grouped by question."""
    out = []
    for r in _jsonl(path):
        passage = _field(r, "passage", path)
        for q in passage["questions"]:
            group = f"{path.stem}:p{r['idx']}:q{q['idx']}"
            for a in q["answers"]:
                fields = {"paragraph": passage["text"], "question": q["question"], "answer": a["text"]}
                out.append(Example(f"{group}:a{a['idx']}", fields,
                                   label=bool_label(_field(a, "label", path), path), group=group))
    return out


def read_record(path: Path) -> list[Example]:
    """ReCoRD (SuperGLUE / FewGLUE jsonl): one example per query.

    Entities are character spans with an inclusive `end`; candidates are the distinct entity
    strings in order of first appearance, and `label` indexes the first that is a gold answer.
    """
    out = []
    for r in _jsonl(path):
        text = r["passage"]["text"]
        entities = tuple(dict.fromkeys(text[e["start"]: e["end"] + 1] for e in r["passage"]["entities"]))
        for qa in r["qas"]:
            answers = tuple(dict.fromkeys(a["text"] for a in qa.get("answers", [])))
            gold = next((i for i, e in enumerate(entities) if e in answers), None)
            if gold is None:
                raise DataFormatError(f"{path}: ReCoRD query {qa['idx']} has no answer among entities")
            fields = {"passage": text, "query": qa["query"], "entities": entities}
            out.append(Example(f"{path.stem}:{qa['idx']}", fields, label=gold, answers=answers,
                               group=f"{path.stem}:{r.get('idx', '')}"))
    return out


def read_squad(path: Path) -> list[Example]:
    """Official SQuAD v1.1 JSON: data -> paragraphs -> qas; every gold answer text is kept."""
    out = []
    for article in _field(_json(path), "data", path):
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                answers = tuple(dict.fromkeys(a["text"] for a in qa["answers"]))
                if not answers:  # v2-style unanswerable question: no v1.1 target to learn
                    continue
                fields = {"title": article.get("title", ""), "context": para["context"],
                          "question": qa["question"]}
                out.append(Example(qa["id"], fields, answers=answers))
    return out


def drop_answer_strings(answer: dict[str, Any]) -> list[str]:
    """One DROP answer dict -> strings: the number, the date as "day month year", or each span."""
    if answer.get("number", "") != "":
        return [str(answer["number"])]
    date = answer.get("date") or {}
    text = " ".join(p for p in (date.get("day", ""), date.get("month", ""), date.get("year", "")) if p)
    if text.strip():
        return [text.strip()]
    return [s for s in answer.get("spans", []) if s]


def read_drop(path: Path) -> list[Example]:
    """Official DROP JSON: {section_id: {passage, qa_pairs}}; grouped by passage.

    Golds are the answer plus any validated answers (as the DROP dev evaluation uses them);
    multi-span answers give one gold per span, as the HF `drop` dataset that MeZO used does.
    """
    out = []
    for section, item in _json(path).items():
        for qa in item["qa_pairs"]:
            golds = drop_answer_strings(qa["answer"])
            for extra in qa.get("validated_answers", []):
                golds += drop_answer_strings(extra)
            if not golds:  # a handful of DROP rows have an empty answer: nothing to learn or score
                continue
            fields = {"passage": item["passage"], "question": qa["question"]}
            out.append(Example(qa["query_id"], fields, answers=tuple(dict.fromkeys(golds)), group=section))
    return out
