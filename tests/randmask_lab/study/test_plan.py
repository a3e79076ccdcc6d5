"""The study plan: LR search on one seed, grid-edge extension, then the other seeds at the chosen LR."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from randmask_lab.errors import RunError
from randmask_lab.experiment.results.record import RunRecord
from randmask_lab.study.plan import CellSpec, StudySpec, needed_runs, neighbour, plan_progress

PROTOCOL = {"sst2": {"n_train": 64, "n_val": 32, "n_test": 64, "epochs": 2}}


def spec(**kw) -> StudySpec:
    cells = kw.pop("cells", [CellSpec("randmask", (1e-2, 3e-2, 1e-1), 1e-4)])
    return StudySpec("t", "tiny", "bf16-true", kw.pop("protocol", PROTOCOL), cells, **kw)


def done(lr: float, seed: int, val: float, method: str = "randmask", ratio: float | None = 1e-4,
         status: str = "done", **config) -> RunRecord:
    cfg = {"model": "tiny", "task": "sst2", "method": method, "ratio": ratio, "lr": lr, "seed": seed,
           "precision": "bf16-true", "batch_size": 8, "mode": "lm", **PROTOCOL["sst2"], **config}
    return RunRecord(f"{lr}-{seed}-{method}", cfg, status, "accuracy", val_loss=val, test_metric=0.5)


def test_ladder_is_exact_decimals() -> None:
    assert neighbour(1e-2, +1) == 3e-2 and neighbour(3e-2, +1) == 1e-1 and neighbour(1e-2, -1) == 3e-3


def test_search_then_seeds() -> None:
    s = spec()
    assert [(n.lr, n.seed) for n in needed_runs(s, [])] == [(1e-2, 0), (3e-2, 0), (1e-1, 0)]
    runs = [done(1e-2, 0, 0.9), done(3e-2, 0, 0.5), done(1e-1, 0, 0.7)]
    assert [(n.lr, n.seed) for n in needed_runs(s, runs)] == [(3e-2, 1), (3e-2, 2)]
    runs += [done(3e-2, 1, 0.6), done(3e-2, 2, 0.4)]
    assert needed_runs(s, runs) == []


def test_an_optimum_at_the_edge_extends_the_grid_up_to_max_extend() -> None:
    s = spec(max_extend=1)
    runs = [done(1e-2, 0, 0.9), done(3e-2, 0, 0.7), done(1e-1, 0, 0.5)]
    assert [(n.lr, n.seed) for n in needed_runs(s, runs)] == [(3e-1, 0)]
    runs.append(done(3e-1, 0, 0.4))  # still at the edge, but the one extension is spent
    assert [(n.lr, n.seed) for n in needed_runs(s, runs)] == [(3e-1, 1), (3e-1, 2)]


def test_a_search_is_unfinished_until_the_plan_chooses_its_lr() -> None:
    s = spec(max_extend=1)
    unfinished = lambda s, runs: plan_progress(s, runs).unfinished_searches  # noqa: E731
    runs = [done(1e-2, 0, 0.9)]
    assert [key[2:] for key in unfinished(s, runs)] == [("sst2", "randmask 1e-04")]
    assert unfinished(s, runs + [done(3e-2, 0, 0.5), done(1e-1, 0, 0.7)]) == set()  # seeds 1, 2 to go
    at_edge = runs + [done(3e-2, 0, 0.7), done(1e-1, 0, 0.5)]  # the ladder goes on upwards: not chosen yet
    assert len(unfinished(s, at_edge)) == 1
    assert unfinished(s, at_edge + [done(3e-1, 0, 0.6)]) == set()
    assert unfinished(spec(cells=[CellSpec("zeroshot")]), [done(1e-3, 0, 0.9, method="zeroshot",
                                                                 ratio=None)]) == set()


def test_the_runs_left_per_cell_are_the_plans_next_runs_counted() -> None:
    s = spec(max_extend=1)
    for runs in ([], [done(1e-2, 0, 0.9)], [done(1e-2, 0, 0.9), done(3e-2, 0, 0.5), done(1e-1, 0, 0.7)],
                 [done(lr, seed, 0.5) for lr in (1e-2, 3e-2, 1e-1) for seed in (0, 1, 2)]):
        planned = needed_runs(s, runs)
        left = plan_progress(s, runs).runs_left
        assert sum(v.total for v in left.values()) == len(planned)
        assert sum(v.search for v in left.values()) == sum(run.seed == s.search_seed for run in planned)
        assert set(left) <= {("sst2", "randmask 1e-04")}
    finished = [done(1e-2, 0, 0.9), done(3e-2, 0, 0.5), done(1e-1, 0, 0.7), done(3e-2, 1, 0.6), done(3e-2, 2, 0.4)]
    assert plan_progress(spec(), finished).runs_left == {}  # a finished cell is absent


def test_other_protocols_precisions_and_failures_do_not_count() -> None:
    s = spec()
    runs = [done(1e-2, 0, 0.9, n_train=999), done(3e-2, 0, 0.5, precision="32"),
            done(1e-1, 0, 0.7, status="failed")]
    assert len(needed_runs(s, runs)) == 3


def test_all_diverged_cells_plan_nothing_more() -> None:
    runs = [done(lr, 0, float("nan"), status="diverged") for lr in (1e-2, 3e-2, 1e-1)]
    assert needed_runs(spec(), runs) == []


def test_zeroshot_runs_once_per_seed() -> None:
    s = spec(cells=[CellSpec("zeroshot")])
    assert [(n.method, n.seed) for n in needed_runs(s, [])] == [("zeroshot", 0), ("zeroshot", 1), ("zeroshot", 2)]


def test_runs_are_planned_task_by_task() -> None:
    protocol = {"sst2": PROTOCOL["sst2"], "rte": PROTOCOL["sst2"]}
    s = StudySpec("t", "tiny", "bf16-true", protocol, [CellSpec("zeroshot"), CellSpec("lora", (1e-3,)),
                                                       CellSpec("full", (1e-5,), tasks=("rte",))], seeds=(0,))
    assert [(n.task, n.method) for n in needed_runs(s, [])] == [
        ("sst2", "zeroshot"), ("sst2", "lora"), ("rte", "zeroshot"), ("rte", "lora"), ("rte", "full")]


def test_every_cells_lr_search_comes_before_any_cells_further_seeds() -> None:
    s = spec(cells=[CellSpec("lora", (1e-3, 3e-3)), CellSpec("randmask", (1e-2, 3e-2), 1e-4),
                    CellSpec("full", (1e-5,), stage=1)], max_extend=0)
    lora = [done(1e-3, 0, 0.5, method="lora", ratio=None), done(3e-3, 0, 0.9, method="lora", ratio=None)]
    planned = [(n.method, n.lr, n.seed) for n in needed_runs(s, lora)]
    assert planned == [("randmask", 1e-2, 0), ("randmask", 3e-2, 0), ("lora", 1e-3, 1), ("lora", 1e-3, 2),
                       ("full", 1e-5, 0)]  # a later stage still waits for the earlier one's seeds


def test_further_seeds_go_seed_by_seed_across_cells_so_a_stopped_study_has_pairs() -> None:
    s = spec(cells=[CellSpec("zeroshot"), CellSpec("lora", (1e-3,)), CellSpec("randmask", (1e-2,), 1e-4)],
             seeds=(0, 1, 2, 3), max_extend=0)
    searched = [done(1e-3, 0, 0.5, method="lora", ratio=None), done(1e-2, 0, 0.5),
                done(1e-3, 1, 0.5, method="lora", ratio=None)]  # lora is a seed ahead
    planned = [(n.method, n.seed) for n in needed_runs(s, searched)]
    assert planned == [("zeroshot", 0), ("zeroshot", 1), ("zeroshot", 2), ("zeroshot", 3),
                       ("randmask", 1), ("lora", 2), ("randmask", 2), ("lora", 3), ("randmask", 3)]


def test_further_seeds_go_seed_by_seed_across_tasks_so_the_task_average_has_pairs() -> None:
    """The findings' task average pairs a seed only where every task has it: a study whose tasks ran their
    further seeds one task after the other had, stopped part-way, one task's seeds that the average could not use."""
    s = spec(cells=[CellSpec("lora", (1e-3,)), CellSpec("randmask", (1e-2,), 1e-4)], seeds=(0, 1, 2),
             max_extend=0, protocol={"rte": PROTOCOL["sst2"], "cb": PROTOCOL["sst2"]})
    searched = [done(1e-3, 0, 0.5, method="lora", ratio=None, task=task) for task in ("rte", "cb")] + \
        [done(1e-2, 0, 0.5, task="rte")]  # cb's randmask search is still to run: it comes before any further seed
    planned = [(n.task, n.method, n.seed) for n in needed_runs(s, searched)]
    assert planned == [("cb", "randmask", 0), ("rte", "lora", 1), ("rte", "randmask", 1), ("cb", "lora", 1),
                       ("rte", "lora", 2), ("rte", "randmask", 2), ("cb", "lora", 2)]


def test_spec_file_errors_are_one_line(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"name": "x", "model": "m", "precision": "32", "protocol": {"rte": {}},
                                "cells": [{"method": "lora"}]}))
    with pytest.raises(RunError, match="has no lrs"):
        StudySpec.from_file(path)
    path.write_text("{")
    with pytest.raises(RunError, match="JSONDecodeError"):
        StudySpec.from_file(path)
    real = StudySpec.from_file(Path(__file__).resolve().parents[3] / "experiments" / "smollm2_study.json")
    assert len(real.cells) == 8 and set(real.protocol) == {"sst2", "rte", "cb", "boolq"}


def test_a_tiny_study_runs_to_completion_and_exports(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """End to end on a tiny Llama and the real RTE files: search, extension, seeds, export, report --from."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiment"))
    from tests.conftest import DATA_DIR
    from tiny import make_tiny_lm

    from randmask_lab.cli import main

    if not (DATA_DIR / "superglue" / "RTE").is_dir():
        pytest.skip("no ../shared/data")
    model = make_tiny_lm(tmp_path / "model")
    study = {"name": "tiny", "model": str(model), "precision": "32", "seeds": [0, 1], "max_extend": 1,
             "common": {"batch_size": 4, "max_length": 64, "mode": "lm"},
             "protocol": {"rte": {"n_train": 8, "n_val": 4, "n_test": 4, "epochs": 1}},
             "cells": [{"method": "randmask", "ratio": 1e-2, "lrs": [1e-2, 1e-1]}]}
    (tmp_path / "s.json").write_text(json.dumps(study))
    out = tmp_path / "runs"
    export = tmp_path / "study.jsonl"
    assert main(["study", str(tmp_path / "s.json"), "--out-dir", str(out), "--plan"]) == 0
    assert "2 runs planned next" in capsys.readouterr().out
    assert main(["study", str(tmp_path / "s.json"), "--out-dir", str(out), "--export", str(export)]) == 0
    assert "nothing left to run" in capsys.readouterr().out
    lines = export.read_text().splitlines()
    assert 3 <= len(lines) <= 4  # 2 search LRs (+1 if the optimum was at an edge) + seed 1 at the chosen LR
    # A fresh machine has only the committed JSONL: the study adopts it and runs nothing again.
    assert main(["study", str(tmp_path / "s.json"), "--out-dir", str(tmp_path / "fresh"), "--export", str(export)]) == 0
    said = capsys.readouterr().out
    assert f"took {len(lines)} finished records" in said and "nothing left to run" in said and "done:" not in said
    # --plan on a fresh machine counts the committed file too, as the run just did.
    assert main(["study", str(tmp_path / "s.json"), "--out-dir", str(tmp_path / "fresh2"), "--export", str(export),
                 "--plan"]) == 0
    assert "0 runs planned next" in capsys.readouterr().out
    assert main(["report", "--from", str(export)]) == 0
    assert "| randmask 1e-02 |" in capsys.readouterr().out


def test_bad_options_and_protocol_values_are_one_error_before_any_run(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    from randmask_lab.cli import main

    study = {"name": "bad", "model": "tiny", "precision": "32", "protocol": {"sst2": PROTOCOL["sst2"]},
             "cells": [{"method": "lora", "lrs": [1e-3]}]}
    (tmp_path / "s.json").write_text(json.dumps(study))
    out = tmp_path / "runs"
    assert main(["study", str(tmp_path / "s.json"), "--out-dir", str(out), "--lease-seconds", "-1"]) == 2
    assert "--lease-seconds must be > 0" in capsys.readouterr().err
    study["protocol"]["sst2"] = {**PROTOCOL["sst2"], "n_train": -5}
    (tmp_path / "s.json").write_text(json.dumps(study))
    assert main(["study", str(tmp_path / "s.json"), "--out-dir", str(out)]) == 2
    assert "--n-train must be >= 1" in capsys.readouterr().err
    assert not (out / "results.sqlite").exists()  # nothing ran, nothing was recorded as failed
    study["protocol"]["sst2"] = {**PROTOCOL["sst2"], "group_by_length": "false"}  # a string, not a bool
    (tmp_path / "s.json").write_text(json.dumps(study))
    assert main(["study", str(tmp_path / "s.json"), "--out-dir", str(out), "--plan"]) == 2  # --plan checks too
    assert "--group-by-length must be true or false, got 'false'" in capsys.readouterr().err


def test_with_run_ids_a_stale_record_does_not_count() -> None:
    # A record of the same config but another identity (a mask sampler since changed, other data)
    # is not the run the spec asks for now: it is planned again.
    runs = [done(1e-2, 0, 0.9), done(3e-2, 0, 0.5), done(1e-1, 0, 0.7)]
    current = lambda run: f"{run.lr}-{run.seed}-{run.method}"  # the ids done() gives
    assert [(n.lr, n.seed) for n in needed_runs(spec(), runs, current)] == [(3e-2, 1), (3e-2, 2)]
    changed = lambda run: current(run) + ("-v2" if run.lr == 3e-2 else "")
    assert [(n.lr, n.seed) for n in needed_runs(spec(), runs, changed)] == [(3e-2, 0)]


def test_a_cells_own_seeds_and_stages_order_the_plan() -> None:
    s = spec(cells=[CellSpec("randmask", (1e-2,), 1e-4, stage=1), CellSpec("full", (1e-5,), None, seeds=(0, 1, 2, 3))],
             max_extend=0)
    assert [(n.method, n.seed) for n in needed_runs(s, [])] == [("full", 0), ("randmask", 0)]  # stage 0 first
    runs = [done(1e-5, 0, 0.5, method="full", ratio=None), done(1e-2, 0, 0.5)]
    assert [(n.method, n.seed) for n in needed_runs(s, runs)] == [("full", 1), ("full", 2), ("full", 3),
                                                                 ("randmask", 1), ("randmask", 2)]


@pytest.mark.parametrize("precision, match", [("auto", "a study keeps one precision"), ("fp8", "not one of")])
def test_a_spec_names_one_runnable_precision(tmp_path: Path, precision: str, match: str) -> None:
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"name": "s", "model": "tiny", "precision": precision, "protocol": PROTOCOL,
                                "cells": [{"method": "full", "lrs": [1e-5]}]}))
    with pytest.raises(RunError, match=match):
        StudySpec.from_file(path)


def test_a_cells_seeds_must_hold_the_search_seed(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"name": "s", "model": "tiny", "precision": "32", "protocol": PROTOCOL,
                                "cells": [{"method": "full", "lrs": [1e-5], "seeds": [1, 2]}]}))
    with pytest.raises(RunError, match="search_seed 0 is not one of seeds"):
        StudySpec.from_file(path)


def test_only_stages_keeps_their_cells_and_names_a_missing_stage() -> None:
    s = spec(cells=[CellSpec("randmask", (1e-2,), 1e-4, stage=1), CellSpec("full", (1e-5,), None)])
    assert [c.method for c in s.only_stages([1]).cells] == ["randmask"] and s.only_stages(None) is s
    with pytest.raises(RunError, match="has no stage 4; its stages are 0, 1"):
        s.only_stages([4])


@pytest.mark.parametrize("option", [["--max-runs", "-1"], ["--max-runs", "0"], ["--threads", "0"]])
def test_study_counts_must_be_positive(option, capsys):
    """`--max-runs -1` was taken (and ran nothing); now argparse names the option."""
    from randmask_lab.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["study", "experiments/smollm2_confirm.json", *option, "--plan"])
    assert exit_.value.code == 2 and f"argument {option[0]}: must be a positive integer" in capsys.readouterr().err


def _scored(method: str, ratio: float | None, lr: float, seed: int, test: float, task: str = "sst2") -> RunRecord:
    run = done(lr, seed, 0.5, method=method, ratio=ratio, task=task)
    return RunRecord(f"{run.run_id}-{ratio}-{task}", run.config, "done", "accuracy", val_loss=0.5, test_metric=test)


def _pair(seed: int, diff: float, task: str = "sst2") -> list[RunRecord]:
    return [_scored("randmask", 1e-4, 1e-2, seed, 0.80 + diff, task), _scored("lora", None, 1e-3, seed, 0.80, task)]


def test_the_seed_count_is_reestimated_once_from_the_planned_seeds_spread() -> None:
    from randmask_lab.study.plan import RunsLeft, seeds_decided
    from randmask_lab.study.reestimate import Reestimate

    rule = Reestimate((("randmask 1e-04", "lora"),), max_seeds=8, half_width=0.01)
    s = spec(cells=[CellSpec("lora", (1e-3,)), CellSpec("randmask", (1e-2,), 1e-4)], max_extend=0, reestimate=rule)
    noisy = _pair(0, 0.03) + _pair(1, -0.02) + _pair(2, 0.01)  # sd 2.5 points: 1 point needs ~28 seeds
    assert seeds_decided(s, noisy[:4]) is None  # seed 2 still planned: nothing is decided before the pilot is in
    assert plan_progress(s, noisy[:4]).runs_left[("sst2", "lora")] == RunsLeft(0, 1, reestimate_pending=True)
    assert [(n.method, n.seed) for n in needed_runs(s, noisy[:4])] == [("lora", 2), ("randmask", 2)]
    decided = seeds_decided(s, noisy)
    assert decided is not None and (decided.planned, decided.seeds) == (3, 8)  # capped at max_seeds
    assert decided.needs[0][0] == "sst2: randmask 1e-04 − lora" and decided.needs[0][2] > 8
    assert "8 seeds instead of the 3 planned" in decided.text() and "no mean read" in decided.text()
    assert [(n.method, n.seed) for n in needed_runs(s, noisy)] == [(m, seed) for seed in range(3, 8)
                                                                   for m in ("lora", "randmask")]
    assert plan_progress(s, noisy).runs_left == {("sst2", "lora"): RunsLeft(0, 5),
                                                 ("sst2", "randmask 1e-04"): RunsLeft(0, 5)}
    stale = needed_runs(s, noisy, run_id=lambda run: "made by other code")  # records the plan does not count...
    assert [(n.method, n.seed) for n in stale] == [("lora", 0), ("randmask", 0)]  # ...decide nothing either
    extended = noisy + [r for seed in range(3, 8) for r in _pair(seed, 0.0)]  # the further seeds agree exactly...
    assert seeds_decided(s, extended) == decided and needed_runs(s, extended) == []  # ...and never move the count

    tight = _pair(0, 0.001) + _pair(1, 0.002) + _pair(2, 0.0)  # sd 0.1 points: the planned 3 suffice
    assert seeds_decided(s, tight).seeds == 3 and needed_runs(s, tight) == []
    assert plan_progress(s, tight).runs_left == {}  # decided: nothing pending, nothing left
    assert "the 3 planned suffice" in seeds_decided(s, tight).text()
    assert seeds_decided(spec(cells=s.cells, max_extend=0), noisy) is None  # no rule: the plan as written
    staged = spec(cells=[CellSpec("lora", (1e-3,)), CellSpec("randmask", (1e-2,), 1e-4, stage=1)], max_extend=0,
                  reestimate=rule)
    assert seeds_decided(staged, noisy).seeds == 8
    assert seeds_decided(staged.only_stages([0]), noisy) is None  # a worker of stage 0 alone decides nothing


def test_a_reestimate_rule_is_checked_when_the_spec_is_read(tmp_path: Path) -> None:
    base = {"name": "t", "model": "tiny", "precision": "32", "protocol": PROTOCOL,
            "cells": [{"method": "lora", "lrs": [1e-3]}, {"method": "randmask", "ratio": 1e-4, "lrs": [1e-2]}]}
    path = tmp_path / "spec.json"
    for rule, message in [({"compare": [["randmask 1e-04", "full"]], "max_seeds": 20},
                           r"reestimate.compare names \['full'\], which are not cells of the study \(its cells: "
                           r"lora, randmask 1e-04\)"),
                          ({"compare": [["randmask 1e-04", "lora"]]}, r"reestimate.max_seeds must be an integer"),
                          ({"compare": [["randmask 1e-04", "lora"]], "max_seeds": 20, "half_width": 5},
                           r"reestimate.half_width must be a fraction"),
                          ({"compare": "lora", "max_seeds": 20}, r"reestimate.compare must be a non-empty list"),
                          ({"compare": [["lora", "lora"]], "max_seeds": 20, "pilot": 3}, r"unknown keys \['pilot'\]"),
                          ({"compare": [["lora", "lora"]], "max_seeds": 20}, r"compares lora with itself")]:
        path.write_text(json.dumps({**base, "reestimate": rule}))
        with pytest.raises(RunError, match=message):
            StudySpec.from_file(path)
    path.write_text(json.dumps({**base, "reestimate": {"compare": [["randmask 1e-04", "lora"]], "max_seeds": 20}}))
    assert StudySpec.from_file(path).reestimate.compare == (("randmask 1e-04", "lora"),)


def test_on_two_tasks_the_seed_count_is_read_off_the_task_average() -> None:
    from randmask_lab.study.plan import seeds_decided
    from randmask_lab.study.reestimate import Reestimate

    rule = Reestimate((("randmask 1e-04", "lora"),), max_seeds=40)
    cells = [CellSpec("lora", (1e-3,)), CellSpec("randmask", (1e-2,), 1e-4)]
    s = StudySpec("t", "tiny", "bf16-true", {"sst2": PROTOCOL["sst2"], "cb": PROTOCOL["sst2"]}, cells,
                  max_extend=0, reestimate=rule)
    runs = [r for seed, (sst2, cb) in enumerate([(0.0, 0.04), (0.001, -0.03), (0.0, 0.0)])
            for r in _pair(seed, sst2) + _pair(seed, cb, "cb")]  # cb is noisy, sst2 is not
    decided = seeds_decided(s, runs)
    (name, sd, need), = decided.needs
    per_seed_average = [(0.0 + 0.04) / 2, (0.001 - 0.03) / 2, 0.0]
    assert name == "average: randmask 1e-04 − lora" and sd == pytest.approx(statistics.stdev(per_seed_average))
    assert decided.seeds == need > 3  # the average's spread, not sst2's alone, sets the count
