"""How a committed study file counts: a run adopts it into the store, and ``--plan`` takes the same view."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.randmask_lab.study.test_plan import PROTOCOL

from randmask_lab.errors import RunError
from randmask_lab.experiment.results.record import RunRecord
from randmask_lab.experiment.results.store import ResultStore
from randmask_lab.study.run import adopt_records, with_committed


def record(run_id: str, status: str = "done", test: float = 0.5) -> RunRecord:
    config = {"model": "tiny", "task": "sst2", "method": "lora", "lr": 1e-3, "seed": 0, "batch_size": 4,
              "mode": "lm", **PROTOCOL["sst2"]}
    return RunRecord(run_id, config, status, "accuracy", val_loss=0.7, test_metric=test)


def test_adopt_and_plan_view_count_the_same_committed_records(tmp_path: Path) -> None:
    held = record("a", test=0.9)  # the store's own copy wins over the committed one
    committed = [record("a", test=0.1), record("b"), record("b", test=0.2), record("c", "diverged"),
                 record("d", "failed"), record("e", "running")]
    store = ResultStore(tmp_path / "results.sqlite")
    store.put(held)

    view = with_committed([held], committed)
    assert [r.run_id for r in view] == ["a", "b", "c"]  # each finished id once, the held copy first
    assert adopt_records(store, committed) == 2  # the run takes the same two into its store
    assert sorted(r.run_id for r in store.records()) == ["a", "b", "c"]
    assert store.get("a").test_metric == 0.9 and store.get("b").test_metric == 0.5  # a repeated id: the first


def test_a_study_refuses_uncommitted_code_unless_allowed(monkeypatch) -> None:
    import pytest

    from randmask_lab.errors import RunError
    from randmask_lab.study import run as run_mod

    monkeypatch.setattr(run_mod, "source_version", lambda: {"package": "x", "commit": "abc", "dirty": True})
    with pytest.raises(RunError, match="uncommitted changes .* --allow-dirty"):
        run_mod.check_provenance(allow_dirty=False)
    assert run_mod.check_provenance(allow_dirty=True)["commit"] == "abc"
    monkeypatch.setattr(run_mod, "source_version", lambda: {"package": "x", "commit": None, "dirty": None})
    assert run_mod.check_provenance(allow_dirty=False)["commit"] is None  # an installed wheel: no tree to check


def test_a_study_file_in_another_precision_is_refused() -> None:
    import pytest

    from randmask_lab.errors import RunError
    from randmask_lab.study.plan import CellSpec, StudySpec
    from randmask_lab.study.run import check_one_precision

    spec = StudySpec("s", "tiny", "32", PROTOCOL, [CellSpec("lora", (1e-3,))])
    same, other = record("a"), record("b")
    same.config["precision"], other.config["precision"] = "32", "bf16-mixed"
    check_one_precision(spec, [same], "f.jsonl")
    with pytest.raises(RunError, match="f.jsonl holds tiny runs in precision bf16-mixed and the spec says 32"):
        check_one_precision(spec, [same, other], "f.jsonl")


def test_a_study_file_that_is_not_a_file_is_refused_before_any_run(tmp_path: Path, capsys, monkeypatch) -> None:
    """A folder or a device named as --export was taken for "no study file yet": a run trained, then its export
    failed. Now it is refused up front, as --plan refuses it."""
    import json

    from tests.randmask_lab.study.test_spec_checks import GOOD

    from randmask_lab.cli import main

    monkeypatch.setattr("randmask_lab.experiment.parts.budget.load_config", lambda name: None)  # GOOD's "tiny"

    spec = tmp_path / "s.json"
    spec.write_text(json.dumps(GOOD))
    (tmp_path / "folder").mkdir()
    out = tmp_path / "runs"
    for export in (tmp_path / "folder", Path("/dev/null")):
        for extra in ([], ["--plan"]):
            code = main(["study", str(spec), "--out-dir", str(out), "--export", str(export), "--allow-dirty", *extra])
            err = capsys.readouterr().err.strip()
            assert code == 2 and "not a regular file (study file); refused unread" in err, err
    assert not (out / "results.sqlite").exists()  # nothing ran


def test_a_run_whose_record_never_counts_stops_the_study_instead_of_looping(tmp_path: Path, monkeypatch) -> None:
    """A finished run the plan keeps asking for (its record does not match the cell) is an error, not a spin."""
    import json

    from tests.conftest import DATA_DIR
    from tests.randmask_lab.experiment.tiny import make_tiny_lm

    import randmask_lab.study.plan as plan
    from randmask_lab.study.plan import StudySpec
    from randmask_lab.study.run import run_study

    if not (DATA_DIR / "superglue" / "RTE").is_dir():
        pytest.skip("no ../shared/data")
    study = {"name": "tiny", "model": str(make_tiny_lm(tmp_path / "model")), "precision": "32", "seeds": [0],
             "common": {"batch_size": 4, "max_length": 64, "mode": "lm"}, "cells": [{"method": "zeroshot"}],
             "protocol": {"rte": {"n_train": 8, "n_val": 4, "n_test": 4, "epochs": 1}}}
    (tmp_path / "s.json").write_text(json.dumps(study))
    spec = StudySpec.from_file(tmp_path / "s.json")
    monkeypatch.setattr(plan, "_matches", lambda *args: False)  # as a cell whose runs record another budget did
    with pytest.raises(RunError, match="is finished in the store, yet the plan still needs it"):
        run_study(spec, str(tmp_path / "runs"), execution={"progress": False, "threads": 1}, say=lambda _: None,
                  allow_dirty=True)


def test_a_model_that_cannot_be_found_is_one_error_before_any_run(tmp_path: Path, capsys) -> None:
    """A typo in the spec's model was a failed record for every planned run (89 of them for the confirmatory
    spec), each after its own attempt to load it. Now the study and its plan stop at once, naming the model."""
    import json

    from tests.randmask_lab.study.test_spec_checks import GOOD

    from randmask_lab.cli import main

    spec = tmp_path / "s.json"
    spec.write_text(json.dumps({**GOOD, "model": str(tmp_path / "no-such-model")}))
    out = tmp_path / "runs"
    for extra in ([], ["--plan"]):
        code = main(["study", str(spec), "--out-dir", str(out), "--allow-dirty", "--no-progress", *extra])
        err = capsys.readouterr().err.strip()
        assert code == 2 and "unknown model" in err and "no-such-model" in err and len(err.splitlines()) == 1, err
    assert not (out / "results.sqlite").exists()  # nothing ran, nothing recorded
