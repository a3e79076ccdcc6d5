"""A study's records as a JSONL file: exported from a results store, read back without one."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

from randmask import atomic_write_bytes, loads_strict, read_limited
from randmask_lab.errors import StoreError
from randmask_lab.experiment.results.record import FINISHED, RunRecord
from randmask_lab.study.record_checks import record_problem

MAX_STUDY_BYTES = 1 << 30  # ~10 KB per record: a hundred thousand runs fit
REQUIRED = ("run_id", "config", "status", "metric")
# Fields the tables, the forecast and the compute line do arithmetic on: a number or null where present.
NUMERIC = ("val_loss", "val_metric", "test_metric", "wall_seconds", "train_seconds", "cpu_seconds", "carried_seconds",
           "carried_cpu_seconds")


def export_jsonl(records: Iterable[RunRecord], path: str | Path) -> int:
    """Write ``records`` (sorted by run id, one JSON object a line) atomically; return how many."""
    if Path(path).is_dir():
        raise StoreError(f"{path} is a folder; give the study file's name (e.g. {Path(path) / 'study.jsonl'})")
    rows = sorted((r.to_dict() for r in records), key=lambda d: d["run_id"])
    text = "".join(json.dumps(row, sort_keys=True, allow_nan=False) + "\n" for row in rows)
    atomic_write_bytes(Path(path), text.encode())
    return len(rows)


def export_locked(records: Callable[[], Iterable[RunRecord]], path: str | Path, lock: str | Path) -> int:
    """``export_jsonl(records(), path)`` under an exclusive advisory lock on the file ``lock``.

    Workers sharing a store each export after their runs. Unlocked, one could read the store, another read it with
    one record more and write, and the first then write its older snapshot over it: a record lost from the file
    (two workers started together met it). Under the lock each export reads the store after every export before
    it, and a store's records only grow, so the last write holds them all. Without ``fcntl`` (not POSIX) there is
    no lock; each worker's final export, when nothing is left to run, then narrows the window.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return export_jsonl(records(), path)
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            return export_jsonl(records(), path)
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_jsonl(path: str | Path) -> list[RunRecord]:
    """The records of a study file; a clear error naming the file and line when it is damaged.

    Every field the study reads is checked (``record_checks``). A run id that appears twice with the same
    record is read once; twice with different records (a bad merge or an edit) is an error, since the
    tables would otherwise take one of them silently."""
    file = Path(path)
    data = read_limited(file, MAX_STUDY_BYTES, "study file", error=StoreError,
                        fix="pass a study file written by `randmask export` (experiments/results/<study>.jsonl)")
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise StoreError(f"{file} is not UTF-8 text ({e}); it is not a study file.") from None
    records, seen = [], {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        row = _parse_line(file, n, line)
        missing = [k for k in REQUIRED if not isinstance(row, dict) or k not in row]
        if missing or not isinstance(row.get("config"), dict):
            raise StoreError(f"{file}:{n} is not a run record (missing {missing or ['config']}); "
                             "export it again with `randmask export`.")
        wrong = [k for k in NUMERIC if not _number_or_null(row.get(k))]
        if wrong:
            raise StoreError(f"{file}:{n} has a non-numeric {', '.join(wrong)}; the file is damaged or was not written "
                             "by randmask. Export it again with `randmask export`.")
        problem = record_problem(row)
        if problem:
            raise StoreError(f"{file}:{n} {problem}; the file is damaged or was not written by randmask. Export it "
                             "again with `randmask export`.")
        if row["run_id"] in seen:
            first, earlier = seen[row["run_id"]]
            if earlier != row:
                raise StoreError(f"{file}:{n} repeats run {row['run_id']} of line {first} with other results "
                                 f"({_differing(earlier, row)} differ); a table would silently take one of them. Keep "
                                 "the right line (or export the file again with `randmask export`).")
            continue  # an identical repeat: read once
        seen[row["run_id"]] = (n, row)
        records.append(RunRecord.from_dict(row))
    if not records:
        raise StoreError(f"{file} holds no records.")
    return records


def merge_jsonl(paths: Iterable[str | Path]) -> list[RunRecord]:
    """The records of several study files (the CPU workers' and a GPU session's), each run once.

    A run held by two files must be the same record there, except that a finished record wins over a failed one
    (a failed attempt is retried; the other machine finished it). Two finished records of one run with other
    results are a StoreError naming both files: which one is right is for a person to decide, not for the merge."""
    merged: dict[str, tuple[RunRecord, str]] = {}
    for path in paths:
        for record in read_jsonl(path):
            held = merged.get(record.run_id)
            if held is None or (held[0].status not in FINISHED and record.status in FINISHED):
                merged[record.run_id] = (record, str(path))
                continue
            if record.status not in FINISHED and held[0].status in FINISHED:
                continue
            earlier, new = held[0].to_dict(), record.to_dict()
            if earlier != new:
                raise StoreError(f"run {record.run_id} is in {held[1]} and in {path} with other results "
                                 f"({_differing(earlier, new)} differ); keep the right one of the two lines and merge "
                                 "again")
    return [record for record, _ in merged.values()]


def _differing(a: dict, b: dict) -> str:
    """The first four fields two versions of one record disagree on, for an error message."""
    return ", ".join(sorted(k for k in {*a, *b} if a.get(k) != b.get(k))[:4])


def _parse_line(file: Path, n: int, line: str) -> object:
    """One line as strict JSON (NaN/Infinity and deep nesting refused, as ``randmask.parse_json`` does)."""
    try:
        return loads_strict(line)
    except json.JSONDecodeError as e:
        why = e.msg
    except RecursionError:
        why = "nested deeper than the parser allows"
    except ValueError as e:
        why = str(e)
    raise StoreError(f"{file}:{n} is not a JSON line ({why}); the file is damaged. "
                     "Export it again with `randmask export`.")



def _number_or_null(value: object) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))
