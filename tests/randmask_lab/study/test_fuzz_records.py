"""Fuzzed study-file lines: read_jsonl raises StoreError, or every table and verdict built from it works.

Each example edits one node of one line (or damages the line's bytes) of a small valid study file.
The property runs in a subprocess whose address space is capped (tests/hostile.py), so a line that
made the reader allocate without bound fails the test instead of taking the machine down.
"""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st
from tests.hostile import damage_bytes, fuzz_settings, mutate_json, run_limited

FUZZ = fuzz_settings(max_examples=150)


def _rows() -> list[dict]:
    from tests.randmask_lab.study.test_study import study

    return [r.to_dict() for r in study()]


def _use(records) -> None:
    """What report --from and findings do with the records: every cell, table and finding, or their one-line
    refusal (a StoreError / RunError the CLI prints as one line: e.g. a cell whose LRs share no seed, or a task
    and method in two protocols)."""
    from randmask_lab.errors import RunError, StoreError
    from randmask_lab.study.cells import study_cells
    from randmask_lab.study.findings import finding_a, finding_b, finding_e
    from randmask_lab.study.tables import study_tables

    try:
        cells = study_cells(records)
        study_tables(cells)
        for finding in (finding_a, finding_b, finding_e):
            finding(list(cells.values())).text()
    except (StoreError, RunError):
        return


@FUZZ
@given(st.data())
def fuzz_study_lines(data) -> None:
    from randmask_lab.errors import StoreError
    from randmask_lab.study.records import read_jsonl

    rows = _rows()
    n = data.draw(st.integers(0, len(rows) - 1))
    lines = [json.dumps(r).encode() for r in rows]
    if data.draw(st.booleans()):
        lines[n] = json.dumps(mutate_json(copy.deepcopy(rows[n]), data)).encode()
    else:
        lines[n] = damage_bytes(lines[n], data)
    if data.draw(st.booleans()):  # the edited line also appears a second time (a bad merge)
        lines.append(lines[n])
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "study.jsonl"
        path.write_bytes(b"\n".join(lines) + b"\n")
        try:
            records = read_jsonl(path)
        except StoreError:
            return
    _use(records)


def run_under_memory_limit() -> None:
    fuzz_study_lines()
    print("FUZZ-OK")


def test_fuzzed_study_lines_under_memory_limit() -> None:
    result = run_limited("run_under_memory_limit()",
                         imports="from tests.randmask_lab.study.test_fuzz_records import run_under_memory_limit")
    assert result.returncode == 0 and "FUZZ-OK" in result.stdout, result.stderr[-4000:]
