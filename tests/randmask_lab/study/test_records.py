"""Issue 28, study files: every hostile line is a one-line StoreError (exit 2 from report/findings --from)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from tests.hostile import hang_guard, make_sparse, replace_with_dev_zero, replace_with_fifo
from tests.randmask_lab.study.test_study import study

from randmask_lab.cli import main
from randmask_lab.errors import StoreError
from randmask_lab.study.records import export_jsonl, export_locked, read_jsonl

COMMITTED = Path(__file__).resolve().parents[3] / "experiments" / "results" / "smollm2_study.jsonl"


def _rows() -> list[dict]:
    return [r.to_dict() for r in study()]


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def _edited(fn) -> list:
    rows = _rows()
    fn(rows)
    return rows


CASES = {
    "nan metric": (lambda r: r.__setitem__(0, json.dumps(r[0]).replace('"test_metric": 0.7', '"test_metric": NaN')),
                   "not a JSON line .NaN is not JSON"),
    "infinite loss": (lambda r: r.__setitem__(0, json.dumps({**r[0], "val_loss": 1e999})),
                      "not a JSON line .Infinity is not JSON"),
    "missing config key": (lambda r: r[0]["config"].pop("model"), "config without 'model'"),
    "missing protocol key": (lambda r: r[0]["config"].pop("n_train"), "config without 'n_train'"),
    "seed as a string": (lambda r: r[0]["config"].update(seed="0"), "config.seed = '0'"),
    "lr as a string": (lambda r: r[0]["config"].update(lr="x"), "config.lr = 'x'"),
    "negative lr": (lambda r: r[0]["config"].update(lr=-1e-3), "config.lr"),
    "lr 1e300": (lambda r: r[0]["config"].update(lr=1e300), "config.lr = '1e\\+300'; it must be a learning rate in"),
    "seed 10**400": (lambda r: r[0]["config"].update(seed=10**400), "config.seed = .*in \\[0, 2\\*\\*63 - 1\\]"),
    "loss 1e400 written out": (  # parses to inf: found by a hostile pass, which crashed every export after
        lambda r: r.__setitem__(0, json.dumps(r[0]).replace('"val_loss": ', '"val_loss": 1e400, "x": ', 1)),
        "1e400 is out of the float range"),
    "ratio above one": (lambda r: r[0]["config"].update(ratio=3.0), "config.ratio"),
    "metric in percent": (lambda r: r[0].update(test_metric=56.3), "test_metric = '56.3'"),
    "unknown status": (lambda r: r[0].update(status="finished"), "status 'finished'"),
    "epochs not a list": (lambda r: r[0].update(epochs="x"), "epochs = 'x'"),
    "notes not strings": (lambda r: r[0].update(notes=[1]), "notes"),
    "machine not an object": (lambda r: r[0].update(machine=["AMD EPYC"]), "machine"),
    "deep nesting": (lambda r: r.__setitem__(0, "[" * 100_000 + "]" * 100_000), "nested deeper"),
    "not an object": (lambda r: r.__setitem__(0, "[1, 2]"), "not a run record"),
}


@pytest.mark.parametrize("case", CASES)
def test_hostile_lines_are_one_line_errors(tmp_path, capsys, case):
    edit, match = CASES[case]
    path = _write(tmp_path / "s.jsonl", _edited(edit))
    with pytest.raises(StoreError, match=rf"s.jsonl:1 .*{match}"):
        read_jsonl(path)
    for verb in ("report", "findings"):
        assert main([verb, "--from", str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err and "s.jsonl:1" in err


def test_a_run_id_repeated_with_other_results_is_refused(tmp_path):
    """Read silently, the last line won (a cell moved from 84.7 to 56.3) while `study` kept the first."""
    rows = _rows()
    path = _write(tmp_path / "s.jsonl", [*rows, {**rows[0], "test_metric": 0.563}])
    with pytest.raises(StoreError, match=rf"s.jsonl:{len(rows) + 1} repeats run {rows[0]['run_id']} of line 1 "
                                         r"with other results \(test_metric differ\)"):
        read_jsonl(path)


def test_an_identical_repeat_is_read_once(tmp_path):
    rows = _rows()
    path = _write(tmp_path / "s.jsonl", [*rows, copy.deepcopy(rows[3])])
    assert [r.to_dict() for r in read_jsonl(path)] == rows


def test_non_regular_and_oversized_study_files_are_refused(tmp_path):
    path = tmp_path / "s.jsonl"
    export_jsonl(study(), path)
    make_sparse(path, 2 << 30)
    with pytest.raises(StoreError, match="over the .*-byte limit .study file."):
        read_jsonl(path)
    replace_with_dev_zero(path)
    with pytest.raises(StoreError, match="not a regular file"):
        read_jsonl(path)
    replace_with_fifo(path)
    with hang_guard(30), pytest.raises(StoreError, match="not a regular file"):
        read_jsonl(path)


@pytest.mark.skipif(not COMMITTED.is_file(), reason="no committed study file in this checkout")
def test_the_committed_study_file_passes_every_check():
    records = read_jsonl(COMMITTED)
    assert records and len({r.run_id for r in records}) == len(records)


def test_a_damaged_record_in_a_store_is_a_store_error(tmp_path, capsys):
    import sqlite3

    from randmask_lab.experiment.results.store import ResultStore

    store = ResultStore(tmp_path / "results.sqlite")
    for r in study()[:2]:
        store.put(r)
    with sqlite3.connect(tmp_path / "results.sqlite") as db:
        db.execute("UPDATE runs SET record = ? WHERE run_id = ?", ("{not json", study()[0].run_id))
    with pytest.raises(StoreError, match=f"the record of run {study()[0].run_id} is damaged .*--restart"):
        store.get(study()[0].run_id)
    assert main(["report", "--store", str(tmp_path / "results.sqlite")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is damaged" in err


def test_findings_on_sides_without_a_shared_seed_are_inconclusive(tmp_path, capsys):
    """A valid file whose randmask runs used other seeds than LoRA's: no pairing, so INCONCLUSIVE (was a
    ValueError traceback from the paired difference; found by test_fuzz_records)."""
    rows = _rows()
    for row in rows:
        if row["config"]["method"] == "randmask":
            row["config"]["seed"] += 10
            row["run_id"] += "-other-seed"
    path = _write(tmp_path / "s.jsonl", rows)
    assert main(["findings", "--from", str(path)]) == 0
    out = capsys.readouterr().out
    assert "no shared seed" in out and "(a) randmask 0.1% is not worse than LoRA or full FT" in out
    headline_a = out[out.index("(a)"):].splitlines()[0]
    assert headline_a.endswith(": INCONCLUSIVE"), headline_a


def test_merge_joins_two_machines_files_each_run_once(tmp_path, capsys):
    """A GPU session's export (which began as a copy of the committed file) joins the CPU workers' file."""
    rows = _rows()
    cpu = _write(tmp_path / "cpu.jsonl", rows[:5])
    gpu = _write(tmp_path / "gpu.jsonl", rows[3:])  # rows 3 and 4 are in both, identical
    failed_here = copy.deepcopy(rows[6])
    failed_here.update(status="failed", test_metric=None)
    with_failed = _write(tmp_path / "failed.jsonl", [failed_here])
    out = tmp_path / "joined.jsonl"
    assert main(["merge", str(with_failed), str(cpu), str(gpu), "--out", str(out)]) == 0
    assert f"wrote {len(rows)} records" in capsys.readouterr().out
    joined = {r.run_id: r.to_dict() for r in read_jsonl(out)}
    assert joined == {r["run_id"]: r for r in (x.to_dict() for x in study())}  # the finished record won


def test_merge_refuses_one_run_with_two_results(tmp_path, capsys):
    rows = _rows()
    other = copy.deepcopy(rows[0])
    other["test_metric"] = 0.123
    a, b = _write(tmp_path / "a.jsonl", rows), _write(tmp_path / "b.jsonl", [other])
    out = tmp_path / "joined.jsonl"
    assert main(["merge", str(a), str(b), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "a.jsonl and in" in err and "b.jsonl with other results (test_metric differ)" in err
    assert not out.exists()


@pytest.mark.parametrize("verb", [["export", "--out-dir", "{runs}"], ["merge", "{committed}"]])
def test_a_folder_given_as_the_output_file_is_one_clear_error(tmp_path, capsys, verb):
    """`randmask merge ... --out /tmp` ended in an IsADirectoryError traceback."""
    from randmask_lab.experiment.results.store import ResultStore

    (tmp_path / "runs").mkdir()
    ResultStore(tmp_path / "runs" / "results.sqlite").put(study()[0])
    args = [a.format(runs=tmp_path / "runs", committed=COMMITTED) for a in verb]
    assert main([*args, "--out", str(tmp_path)]) == 2
    assert f"{tmp_path} is a folder; give the study file's name" in capsys.readouterr().err


def test_an_export_waits_for_the_lock_so_an_older_snapshot_never_lands_last(tmp_path):
    """Two workers exporting one store: while one holds the lock the other neither reads the store nor writes, so it
    reads the store after the first's write and the file ends with every record (test_two_workers met the race)."""
    import fcntl
    import threading

    records, path, lock = study(), tmp_path / "study.jsonl", tmp_path / "results.sqlite.export-lock"
    read = threading.Event()

    def store_records():
        read.set()
        return records

    with open(lock, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another worker exporting
        worker = threading.Thread(target=export_locked, args=(store_records, path, lock))
        worker.start()
        worker.join(0.5)
        assert worker.is_alive() and not read.is_set() and not path.exists()  # waits before it reads
        fcntl.flock(held, fcntl.LOCK_UN)
    worker.join(10)
    assert not worker.is_alive() and len(read_jsonl(path)) == len(records)
