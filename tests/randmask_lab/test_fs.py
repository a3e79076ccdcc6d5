"""Issue 28: a full disk or a read-only out-dir is a one-line error (exit 2) that names the fix; nothing is lost."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
from experiment.tiny import make_tiny_lm
from tests.hostile import make_read_only

from randmask_lab.cli import main
from randmask_lab.errors import RunError
from randmask_lab.experiment.results.store import ResultStore
from randmask_lab.fs import disk_problem, write_json


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return str(make_tiny_lm(tmp_path_factory.mktemp("fs_tiny")))


def _args(tiny: str, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", tiny, "--task", "rte", "--out-dir", str(out), "--n-train", "12", "--n-val", "4",
            "--n-test", "4", "--epochs", "2", "--batch-size", "4", "--max-length", "96", "--no-progress",
            "--checkpoint-every", "1", "--threads", "1", *extra]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_disk_problem_names_the_file_and_the_fix():
    full = OSError(errno.ENOSPC, "No space left on device", "/runs/x/checkpoint/state.json")
    assert "no space left on the device writing /runs/x/checkpoint/state.json" in disk_problem(full)
    assert "run the same command again" in disk_problem(full)
    assert "read-only" in disk_problem(OSError(errno.EROFS, "Read-only file system", "/ro"))
    assert disk_problem(OSError(errno.ENOENT, "No such file")) is None and disk_problem(ValueError()) is None
    in_the_way = disk_problem(OSError(errno.ENOTDIR, "Not a directory", "/runs/file/x"))
    assert "cannot use /runs/file/x" in in_the_way and "output option" in in_the_way


def test_a_full_disk_mid_run_loses_nothing(tiny, tmp_path, capsys, monkeypatch):
    """The disk fills at the third checkpoint: one line, exit 2; run again, it resumes and ends where an
    uninterrupted run ends."""
    from randmask_lab.experiment.training import checkpoint

    assert main(_args(tiny, tmp_path / "clean")) == 0
    capsys.readouterr()
    real, calls = checkpoint.write_json, []

    def fills_up(path, data):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(checkpoint, "write_json", fills_up)
    assert main(_args(tiny, tmp_path / "full")) == 2
    assert "no space left on the device writing" in _one_line_error(capsys)
    monkeypatch.setattr(checkpoint, "write_json", real)
    assert main(_args(tiny, tmp_path / "full")) == 0
    (clean,) = ResultStore(tmp_path / "clean" / "results.sqlite").records()
    (resumed,) = ResultStore(tmp_path / "full" / "results.sqlite").records()
    assert resumed.resumed_at == 2 and resumed.status == "done"
    assert [e["val_loss"] for e in resumed.epochs] == [e["val_loss"] for e in clean.epochs]
    assert resumed.test_metric == clean.test_metric


def test_a_read_only_out_dir_is_named_and_its_store_still_reads(tiny, tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(_args(tiny, out, "--max-steps", "1", "--epochs", "1")) == 0
    capsys.readouterr()
    undo = make_read_only(tmp_path)
    try:
        assert main(_args(tiny, out, "--max-steps", "1", "--epochs", "1", "--seed", "1")) == 2
        err = _one_line_error(capsys)
        assert "cannot be written" in err and "The store itself is fine" in err and "damaged" not in err
        assert main(["report", "--out-dir", str(out)]) == 0  # a healthy store is still read
        assert "randmask" in capsys.readouterr().out
        assert main(_args(tiny, tmp_path / "new" / "runs", "--max-steps", "1")) == 2
        assert "pass a writable --out-dir" in _one_line_error(capsys)
    finally:
        undo()


def test_a_read_only_store_file_reads_in_python(tmp_path):
    from randmask_lab.experiment.results.record import RunRecord

    store = ResultStore(tmp_path / "results.sqlite")
    config = {"model": "m", "task": "rte", "method": "full", "lr": 1e-3, "seed": 0, "n_train": 1, "n_val": 1,
              "n_test": 1, "epochs": 1, "batch_size": 1, "mode": "lm"}
    store.put(RunRecord("r1", config, "done", "accuracy", test_metric=0.5))
    undo = make_read_only(tmp_path)
    try:
        again = ResultStore(tmp_path / "results.sqlite")
        assert again.read_only and again.get("r1").test_metric == 0.5 and len(again) == 1
        assert json.dumps(again.rows()[0]["run_id"]) == '"r1"'
    finally:
        undo()


def test_a_figure_is_written_whole_or_not_at_all(tmp_path):
    """save_figure renders into memory first: a figure that fails to render leaves the last whole file in place."""
    from matplotlib.figure import Figure

    from randmask_lab.fs import save_figure

    fig = Figure(figsize=(2, 2))
    fig.add_subplot().plot([0, 1], [1, 0])
    path = save_figure(fig, tmp_path / "figures" / "curve.png")  # makes the folder
    whole = path.read_bytes()
    assert whole.startswith(b"\x89PNG") and len(whole) > 100
    broken = Figure(figsize=(2, 2))
    broken.add_subplot().set_title("$\\unknowncommand$")  # mathtext fails at render time
    with pytest.raises(ValueError):
        save_figure(broken, path)
    assert path.read_bytes() == whole and sorted(p.name for p in path.parent.iterdir()) == ["curve.png"]


def test_json_is_written_whole_or_not_at_all(tmp_path):
    from randmask_lab.fs import write_json

    path = write_json(tmp_path / "out" / "summary.json", {"a": 1})
    with pytest.raises(TypeError):
        write_json(path, {"a": object()})  # not serializable: refused before the file is touched
    assert json.loads(path.read_text()) == {"a": 1}
    assert sorted(p.name for p in path.parent.iterdir()) == ["summary.json"]


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, which takes no new folders")
def test_an_out_folder_the_file_system_refuses_is_one_line(tmp_path, capsys):
    """`--out /proc/x` was a FileNotFoundError traceback (mkdir's ENOENT under /proc): now exit 2 and one line."""
    args = ["theory", "--out", "/proc/randmask-x", "--n", "4", "--d", "20", "--p-values", "0.5", "--seeds", "0",
            "--gd-steps", "5", "--noise-draws", "1"]
    assert main(args) == 2
    err = _one_line_error(capsys)
    assert "cannot create the folder /proc/randmask-x" in err and "writable folder" in err
    with pytest.raises(RunError, match="cannot create the folder /proc/randmask-x/figures"):
        write_json("/proc/randmask-x/figures/a.json", {})
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    with pytest.raises(RunError, match=f"cannot create the folder {a_file}/sub .*a file stands where a folder"):
        write_json(a_file / "sub" / "a.json", {})
