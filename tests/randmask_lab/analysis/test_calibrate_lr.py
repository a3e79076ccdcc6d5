"""`randmask calibrate-lr`'s pairing: a suggestion meets the best LR of its own model's cell, and damaged
suggest_lr.json files are one-line errors naming the file and field."""

from __future__ import annotations

import json

import pytest

from randmask_lab.analysis.calibrate_lr import calibration_pairs, calibration_report
from randmask_lab.errors import RunError
from randmask_lab.experiment import ResultStore, RunConfig, RunRecord


def _store(tmp_path, cells: dict[tuple[str, int], dict[float, float]]) -> ResultStore:
    """A store with one sst2 randmask 1e-02 run per (model, epochs) cell and LR, at the given validation loss."""
    store = ResultStore(tmp_path / "results.sqlite")
    for (model, epochs), losses in cells.items():
        for lr, loss in losses.items():
            config = RunConfig(model=model, task="sst2", method="randmask", ratio=0.01, lr=lr, seed=0, epochs=epochs)
            store.put(RunRecord(config.run_id, config.to_dict(), "done", "accuracy", val_loss=loss, val_metric=0.7,
                                test_metric=0.6, best_epoch=1, trainable=10, total=1000))
    return store


def _suggestion(folder, **changes):
    data = {"lambda_max": 0.43, "adam_lr": 0.0336, "calibration": 1.0,
            "run": {"model": "tiny", "task": "sst2", "method": "randmask", "ratio": 0.01, "density": None}}
    data.update(changes)
    folder.mkdir(parents=True)
    (folder / "suggest_lr.json").write_text(json.dumps(data) if not isinstance(changes.get("text"), str)
                                            else changes["text"])
    return folder / "suggest_lr.json"


TWO_MODELS = {("tiny", 5): {1e-3: 0.9, 1e-1: 0.5}, ("tiny2", 5): {3e-3: 0.4}}  # best LRs: 0.1 and 0.003


def test_a_suggestion_is_paired_with_its_own_models_best_lr(tmp_path, capsys):
    """The best LRs were keyed by method label alone, the last model's won: tiny's suggestion met tiny2's 0.003
    and the factor printed was 0.0893 instead of 0.1 / 0.0336 = 2.98."""
    store = _store(tmp_path, TWO_MODELS)
    _suggestion(tmp_path / "s" / "tiny")
    rows = calibration_pairs([tmp_path / "s"], store, "sst2")
    assert [(r["label"], r["best"]) for r in rows] == [("randmask 1e-02", 0.1)]
    assert "Fitted calibration factor (geometric mean of best / suggested): 2.98;" in calibration_report(rows)
    _suggestion(tmp_path / "s" / "tiny2", run={**json.loads((tmp_path / "s" / "tiny" / "suggest_lr.json")
                                                            .read_text())["run"], "model": "tiny2"})
    assert sorted(r["best"] for r in calibration_pairs([tmp_path / "s"], store, "sst2")) == [0.003, 0.1]


def test_a_suggestion_on_a_model_the_sweep_lacks_is_skipped_and_said(tmp_path, capsys):
    store = _store(tmp_path, TWO_MODELS)
    _suggestion(tmp_path / "s" / "a")
    path = _suggestion(tmp_path / "s" / "b", run={"model": "other", "task": "sst2", "method": "randmask",
                                                  "ratio": 0.01})
    _suggestion(tmp_path / "s" / "c", run={"model": "tiny", "task": "rte", "method": "randmask", "ratio": 0.01})
    assert [r["best"] for r in calibration_pairs([tmp_path / "s"], store, "sst2")] == [0.1]
    err = capsys.readouterr().err
    assert f"note: skipped {path}: the store has no randmask 1e-02 cell on model 'other' (only on 'tiny', " in err
    assert "skipped 1 suggest_lr.json of tasks other than 'sst2'" in err
    with pytest.raises(RunError, match="matches a 'sst2' cell \\(task, method, budget and model\\)"):
        calibration_pairs([tmp_path / "s" / "b"], store, "sst2")


def test_a_suggestion_that_cannot_tell_its_cell_is_refused_not_guessed(tmp_path):
    """Two protocols of one model with different best LRs, or a file without its model and a store of two
    models: which best LR is meant is unknown, so a one-line error, not the last one found."""
    protocols = _store(tmp_path / "p", {("tiny", 5): {1e-3: 0.9, 1e-1: 0.5}, ("tiny", 2): {1e-3: 0.4, 1e-1: 0.5}})
    _suggestion(tmp_path / "s" / "a")
    with pytest.raises(RunError, match="several randmask 1e-02 cells with different best LRs") as e:
        calibration_pairs([tmp_path / "s"], protocols, "sst2")
    assert "2 ep" in str(e.value) and "5 ep" in str(e.value) and "\n" not in str(e.value)
    _suggestion(tmp_path / "old" / "a", run={"task": "sst2", "method": "randmask", "ratio": 0.01})
    with pytest.raises(RunError, match="'tiny' \\(.*\\): 0.1; 'tiny2' \\(.*\\): 0.003\\)"):
        calibration_pairs([tmp_path / "old"], _store(tmp_path, TWO_MODELS), "sst2")
    one_model = _store(tmp_path / "one", {("tiny", 5): {1e-3: 0.9, 1e-1: 0.5}})  # unambiguous: paired
    assert [r["best"] for r in calibration_pairs([tmp_path / "old"], one_model, "sst2")] == [0.1]


RUN = {"model": "tiny", "task": "sst2", "method": "randmask", "ratio": 0.01}
DAMAGE = {  # case: (a change to the data, or the file's text; what the error must say)
    "calibration 0": ({"calibration": 0}, "calibration is 0, not above 0"),
    "no adam_lr": ({"adam_lr": None}, "adam_lr is missing"),
    "nan": ({"text": '{"adam_lr": NaN}'}, "is not valid JSON (NaN"),
    "infinity": ({"text": '{"lambda_max": Infinity}'}, "is not valid JSON (Infinity"),
    "string lr": ({"adam_lr": "x"}, 'adam_lr is "x", not a number'),
    "negative lr": ({"adam_lr": -1.0}, "adam_lr is -1.0, not above 0"),
    "huge lr": ({"adam_lr": 10 ** 400}, "adam_lr is 1000"),
    "lambda 0": ({"lambda_max": 0.0}, "lambda_max is 0.0"),
    "lr underflows": ({"adam_lr": 1e-300, "calibration": 1e300}, "adam_lr / calibration is 0.0"),
    "run list": ({"run": [1]}, "run is [1], not a run block"),
    "no run": ({"run": None}, "run is missing"),
    "task number": ({"run": {**RUN, "task": 5}}, "run.task is 5, not a name"),
    "no method": ({"run": {**RUN, "method": None}}, "run.method is missing"),
    "model number": ({"run": {**RUN, "model": 5}}, "run.model is 5"),
    "ratio over 1": ({"run": {**RUN, "ratio": 2}}, "run.ratio is 2, above 1"),
    "density string": ({"run": {**RUN, "ratio": None, "density": "x"}}, 'run.density is "x"'),
    "top level list": ({"text": "[1]"}, "the top level is [1]"),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_a_damaged_suggestion_is_one_line_naming_file_and_field(tmp_path, case):
    """calibration 0 was a ZeroDivisionError, a NaN LR printed the factor as nan, a negative one a bare
    ValueError, other damage KeyError / TypeError / AttributeError tracebacks."""
    change, expected = DAMAGE[case]
    store = _store(tmp_path, TWO_MODELS)
    path = _suggestion(tmp_path / "s", **change)
    with pytest.raises(RunError) as e:
        calibration_pairs([tmp_path / "s"], store, "sst2")
    message = str(e.value)
    assert message.startswith(str(path)) and expected in message, message
    assert "\n" not in message and message.endswith("delete it and run suggest-lr again")


def test_a_suggestion_meets_the_cell_of_its_own_method_options(tmp_path):
    """LoRA r=1 and r=16 of one model are two cells with their own best LRs: suggest-lr records its method options
    and calibrate-lr pairs on them. A file without them (older) matches either, so two best LRs are refused."""
    store = ResultStore(tmp_path / "results.sqlite")
    for r, losses in ((1, {1e-2: 0.4, 1e-3: 0.6}), (16, {1e-2: 0.7, 1e-3: 0.5})):
        for lr, loss in losses.items():
            config = RunConfig(model="tiny", task="sst2", method="lora", method_options={"r": r}, lr=lr, seed=0)
            store.put(RunRecord(config.run_id, config.to_dict(), "done", "accuracy", val_loss=loss, val_metric=0.7,
                                test_metric=0.6, best_epoch=1, trainable=10, total=1000))
    run = {"model": "tiny", "task": "sst2", "method": "lora", "ratio": None, "density": None}
    for r, best in ((1, 1e-2), (16, 1e-3)):
        _suggestion(tmp_path / f"r{r}", run={**run, "method_options": {"r": r}})
        assert [row["best"] for row in calibration_pairs([tmp_path / f"r{r}"], store, "sst2")] == [best]
    _suggestion(tmp_path / "old", run=run)
    with pytest.raises(RunError, match=r"""'tiny' \{"r": 16\} \(.*\): 0.001; 'tiny' \{"r": 1\} \(.*\): 0.01\)"""):
        calibration_pairs([tmp_path / "old"], store, "sst2")
    _suggestion(tmp_path / "r8", run={**run, "method_options": {"r": 8}})
    assert calibration_pairs([tmp_path / "r8", tmp_path / "r1"], store, "sst2")[0]["best"] == 1e-2  # r8: skipped
