"""`randmask figure4`'s collect: results of one task and model only, and every field it reads checked."""

from __future__ import annotations

import json

import pytest

from randmask_lab.analysis.figure4 import collect, markdown
from randmask_lab.errors import RunError


def _run(**changes) -> dict:
    run = {"model": "tiny", "task": "sst2", "method": "randmask", "ratio": 1e-3, "seed": 0, "trained": True,
           "n_trainable": 36, "n_total": 28832}
    return {**run, **changes}


def _write(folder, name="hessian.json", text=None, **data):
    folder.mkdir(parents=True)
    (folder / name).write_text(text if text is not None else json.dumps(data))
    return folder / name


@pytest.mark.parametrize("seeds", [(0, 1), (0, 0)])
def test_results_of_two_tasks_are_refused_not_pooled_as_seeds(tmp_path, seeds):
    """An SST-2 seed-0 and an RTE seed-1 hessian.json were one row "(n=2)"; with equal seeds the error blamed a
    duplicate seed. Now: one line naming both files and both tasks."""
    a = _write(tmp_path / "a", lambda_max=0.07, run=_run(seed=seeds[0]))
    b = _write(tmp_path / "b", lambda_max=0.11, run=_run(task="rte", seed=seeds[1]))
    one_task = r"2 tasks: rte \(.*\), sst2 \(.*\); figure4 shows one task: pass only the folders of one task"
    with pytest.raises(RunError, match=one_task) as e:
        collect([tmp_path])
    assert str(a) in str(e.value) and str(b) in str(e.value) and "\n" not in str(e.value)
    assert "second" not in str(e.value)


def test_results_of_two_models_are_refused(tmp_path):
    _write(tmp_path / "a", lambda_max=0.07, run=_run())
    _write(tmp_path / "b", lambda_max=0.11, run=_run(model="other", seed=1))
    with pytest.raises(RunError, match=r"2 models: other \(.*\), tiny \(.*\); .*of one model"):
        collect([tmp_path])


def test_one_task_and_model_over_seeds_keeps_its_table(tmp_path):
    """The normal case is unchanged: seeds of one cell averaged, no task or model column; a file that records
    neither (Python API without meta) joins in."""
    _write(tmp_path / "s0", lambda_max=3.0, run=_run())
    _write(tmp_path / "s1", lambda_max=5.0, run=_run(seed=1))
    _write(tmp_path / "full", lambda_max=2.0, run=_run(method="full", ratio=None, task=None, model=None,
                                                       n_trainable=28832))
    _write(tmp_path / "d", "distance.json", total=0.0, run=_run())
    rows = collect([tmp_path])
    table = markdown(rows)
    assert table.splitlines()[0] == "| Method | Trainable | Share | λ_max before | λ_max after | Distance |"
    assert "| randmask | 36 | 0.1% | - | 3.873 (n=2) | 0 |" in table and "| full | 28,832 | 100% | - | 2 | - |" in table


DAMAGE = {  # case: (file, text or a change to the data, the field the error must name)
    "nan": ("hessian.json", '{"lambda_max": NaN, "run": %s}', "not valid JSON (NaN"),
    "infinity": ("hessian.json", '{"lambda_max": Infinity, "run": %s}', "not valid JSON (Infinity"),
    "overflow": ("distance.json", '{"total": 1e400, "run": %s}', "not valid JSON (1e400"),
    "negative total": ("distance.json", {"total": -1.0}, "total is -1.0, below 0"),
    "string total": ("distance.json", {"total": "1"}, 'total is "1", not a number'),
    "no lambda_max": ("hessian.json", {"lambda_max": None}, "lambda_max is missing"),
    "bool lambda_max": ("hessian.json", {"lambda_max": True}, "lambda_max is true"),
    "which": ("hessian.json", {"which": "largest"}, 'which is "largest"'),
    "n_total 0": ("hessian.json", {"run": _run(ratio=None, n_total=0)}, "run.n_total is 0, not above 0"),
    "n_total missing": ("hessian.json", {"run": _run(n_total=None)}, "run.n_total is missing"),
    "huge count": ("hessian.json", {"run": _run(ratio=None, n_trainable=10 ** 400, n_total=1)}, "run.n_trainable"),
    "more trainable than total": ("hessian.json", {"run": _run(n_trainable=5, n_total=4)}, "run.n_trainable is 5"),
    "float count": ("hessian.json", {"run": _run(n_trainable=3.5)}, "run.n_trainable is 3.5, not an integer"),
    "seed string": ("hessian.json", {"run": _run(seed="x")}, 'run.seed is "x", not an integer'),
    "seed fraction": ("hessian.json", {"run": _run(seed=1.5)}, "run.seed is 1.5"),
    "seed negative": ("hessian.json", {"run": _run(seed=-1)}, "run.seed is -1, below 0"),
    "ratio 0": ("hessian.json", {"run": _run(ratio=0)}, "run.ratio is 0, not above 0"),
    "ratio over 1": ("hessian.json", {"run": _run(ratio=2)}, "run.ratio is 2, above 1"),
    "trained string": ("hessian.json", {"run": _run(trained="no")}, 'run.trained is "no", not bool'),
    "task number": ("hessian.json", {"run": _run(task=5)}, "run.task is 5, not str"),
    "method number": ("hessian.json", {"run": _run(method=5)}, "run.method is 5"),
    "run list": ("hessian.json", {"run": ["method"]}, 'run is ["method"], not a run block'),
    "top level list": ("hessian.json", "[1, 2]", "the top level is [1, 2]"),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_a_damaged_result_is_one_line_naming_file_and_field(tmp_path, case):
    """NaN / negative values were printed and plotted; Infinity, a missing key, a string, n_total 0 or seed "x"
    were Python tracebacks (matplotlib ValueError, KeyError, TypeError, ZeroDivisionError, ValueError)."""
    name, change, expected = DAMAGE[case]
    run = _run()
    data = {"lambda_max": 0.07, "which": "top", "run": run} if name == "hessian.json" else {"total": 1.0, "run": run}
    if isinstance(change, str):
        text = change % json.dumps(run) if "%s" in change else change
    else:
        text = json.dumps({**data, **change})
    path = _write(tmp_path / "cell", name, text=text)
    with pytest.raises(RunError) as e:
        collect([tmp_path])
    message = str(e.value)
    assert message.startswith(str(path)) and expected in message, message
    assert "\n" not in message and message.endswith("delete it and run its measurement again")
