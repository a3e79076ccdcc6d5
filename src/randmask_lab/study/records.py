"""A study's records as a JSONL file: exported from a results store, read back without one."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from randmask import atomic_write_bytes
from randmask_lab.errors import StoreError
from randmask_lab.experiment.record import RunRecord

REQUIRED = ("run_id", "config", "status", "metric")
# Fields the tables, the forecast and the compute line do arithmetic on: a number or null where present.
NUMERIC = ("val_loss", "val_metric", "test_metric", "wall_seconds", "train_seconds", "cpu_seconds", "carried_seconds",
           "carried_cpu_seconds")


def export_jsonl(records: Iterable[RunRecord], path: str | Path) -> int:
    """Write ``records`` (sorted by run id, one JSON object a line) atomically; return how many."""
    rows = sorted((r.to_dict() for r in records), key=lambda d: d["run_id"])
    text = "".join(json.dumps(row, sort_keys=True, allow_nan=False) + "\n" for row in rows)
    atomic_write_bytes(Path(path), text.encode())
    return len(rows)


def read_jsonl(path: str | Path) -> list[RunRecord]:
    """The records of a study file; a clear error naming the file and line when it is damaged."""
    file = Path(path)
    if not file.is_file():
        raise StoreError(f"{file} not found: pass a study file written by `randmask export` "
                         "(experiments/results/<study>.jsonl).")
    records = []
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise StoreError(f"{file} is not UTF-8 text ({e}); it is not a study file.") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise StoreError(f"{file}:{n} is not a JSON line ({e.msg}); the file is damaged. "
                             "Export it again with `randmask export`.") from None
        missing = [k for k in REQUIRED if not isinstance(row, dict) or k not in row]
        if missing or not isinstance(row.get("config"), dict):
            raise StoreError(f"{file}:{n} is not a run record (missing {missing or ['config']}); "
                             "export it again with `randmask export`.")
        wrong = [k for k in NUMERIC if not _number_or_null(row.get(k))]
        if wrong:
            raise StoreError(f"{file}:{n} has a non-numeric {', '.join(wrong)}; the file is damaged or was not written "
                             "by randmask. Export it again with `randmask export`.")
        records.append(RunRecord.from_dict(row))
    if not records:
        raise StoreError(f"{file} holds no records.")
    return records


def _number_or_null(value: object) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))
