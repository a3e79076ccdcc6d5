"""Study files, intervals, paired differences, tables, figures and verdicts, on records built here."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
from scipy import stats as scipy_stats

from randmask_lab.cli import main
from randmask_lab.errors import StoreError
from randmask_lab.experiment.results.record import RunRecord
from randmask_lab.experiment.run.config import RunConfig
from randmask_lab.study.cells import study_cells
from randmask_lab.study.findings import FAILS, HOLDS, UNSURE, finding_a, finding_b, finding_e, findings
from randmask_lab.study.records import export_jsonl, read_jsonl
from randmask_lab.study.stats import average_by_seed, mean_interval, paired_difference
from randmask_lab.study.tables import study_tables

PROTOCOL = {"n_train": 64, "n_val": 32, "n_test": 64, "epochs": 2, "batch_size": 8, "mode": "lm"}


def record(task: str, method: str, lr: float, seed: int, test: float, val: float, ratio: float | None = None,
           status: str = "done") -> RunRecord:
    config = {"model": "tiny", "task": task, "method": method, "ratio": ratio, "density": None, "lr": lr,
              "seed": seed, **PROTOCOL}
    return RunRecord(run_id=f"{task}-{method}-{ratio}-{lr}-{seed}", config=config, status=status, metric="accuracy",
                     val_loss=val if status == "done" else None, test_metric=test if status == "done" else None)


def study(lora_shift: float = 0.0) -> list[RunRecord]:
    """Two tasks; LR search on seed 0, seeds 1 and 2 at the chosen LR."""
    records = []
    for t, task in enumerate(("sst2", "rte")):
        for k, (method, ratio, grid, best) in enumerate((("lora", None, (1e-4, 1e-3, 3e-3), 1e-3),
                                                         ("randmask", 1e-3, (1e-3, 1e-2, 3e-2), 1e-2),
                                                         ("randmask", 1e-4, (1e-2, 3e-2, 1e-1), 3e-2),
                                                         ("randmask", 1e-5, (3e-2, 1e-1, 3e-1), 1e-1),
                                                         ("structured", 1e-4, (1e-2, 3e-2, 1e-1), 3e-2))):
            base = 0.80 - 0.1 * t + (lora_shift if method == "lora" else 0) - (0.05 if method == "structured" else 0)
            for lr in grid:
                gap = abs(math.log10(lr / best))
                records.append(record(task, method, lr, 0, base - gap / 10, 0.5 + gap, ratio))
            for seed in (1, 2):
                jitter = 0.001 * (seed * (k + 1) % 3)  # each cell its own, so paired differences have a spread
                records.append(record(task, method, best, seed, base + 0.002 * seed + jitter, 0.5 + 0.01 * seed,
                                      ratio))
    return records


def test_t_interval_matches_scipy() -> None:
    values = [0.81, 0.84, 0.79]
    est = mean_interval(values)
    low, high = scipy_stats.t.interval(0.95, 2, loc=est.mean, scale=scipy_stats.sem(values))
    assert est.low == pytest.approx(low) and est.high == pytest.approx(high)
    assert mean_interval([0.5]).low is None


def test_paired_difference_uses_shared_seeds_only() -> None:
    diff = paired_difference({0: 0.9, 1: 0.8, 2: 0.7}, {0: 0.8, 1: 0.7, 5: 0.1})
    assert diff.n == 2 and diff.mean == pytest.approx(0.1) and diff.std == pytest.approx(0.0)
    assert average_by_seed({"a": {0: 1.0, 1: 0.0}, "b": {0: 0.0}}) == {0: 0.5}


def test_lr_is_chosen_on_the_search_seed_and_extra_seeds_do_not_move_it() -> None:
    cells = study_cells(study())
    cell = next(c for k, c in cells.items() if k[2] == "sst2" and k[3] == "randmask 1e-04")
    assert cell.lr == 3e-2 and set(cell.tests) == {0, 1, 2} and cell.at_grid_edge is None
    edge = next(c for k, c in cells.items() if k[2] == "sst2" and k[3] == "randmask 1e-05")
    assert edge.lr == 1e-1 and edge.at_grid_edge is None


def test_lr_curves_compare_the_search_seed_only() -> None:
    # Seeds 1 and 2 at the chosen LR validate far worse than seed 0 there: averaged in, the chosen LR would
    # plot above the others (what the study's first Fig. 3 analogue showed).
    runs = [record("sst2", "lora", 1e-3, 0, 0.70, 0.60), record("sst2", "lora", 1e-2, 0, 0.80, 0.50),
            record("sst2", "lora", 1e-2, 1, 0.60, 0.90), record("sst2", "lora", 1e-2, 2, 0.62, 0.95)]
    (cell,) = study_cells(runs).values()
    assert cell.lr == 1e-2 and min(cell.search_val_loss, key=cell.search_val_loss.get) == cell.lr
    assert cell.search_val_loss == {1e-3: 0.60, 1e-2: 0.50}
    assert cell.search_test == {1e-3: 0.70, 1e-2: 0.80} and cell.tests == {0: 0.80, 1: 0.60, 2: 0.62}


def test_diverged_lrs_are_never_chosen() -> None:
    runs = [record("sst2", "lora", 1e-3, 0, 0.8, 0.4), record("sst2", "lora", 1e-2, 0, 0.0, 0.0, status="diverged")]
    (cell,) = study_cells(runs).values()
    assert cell.lr == 1e-3
    assert cell.choice_margin is None  # the only other LR diverged: nothing to be decisive against


def test_choice_margin_is_the_runner_up_gap_and_finding_b_shows_it() -> None:
    cells = study_cells(study())
    cell = next(c for k, c in cells.items() if k[2] == "sst2" and k[3] == "randmask 1e-04")
    assert cell.choice_margin == pytest.approx(math.log10(3))  # val 0.5 + |log10(lr / best)|: 1e-2 is next
    assert "1e-04: 3e-02 (margin 0.477)" in finding_b(list(cells.values())).evidence[1]


def test_jsonl_round_trip_and_damage(tmp_path: Path) -> None:
    path = tmp_path / "study.jsonl"
    assert export_jsonl(study(), path) == len(study())
    assert [r.to_dict() for r in read_jsonl(path)] == sorted((r.to_dict() for r in study()), key=lambda d: d["run_id"])
    path.write_text(path.read_text() + "{not json\n")
    with pytest.raises(StoreError, match=r"study.jsonl:\d+ is not a JSON line"):
        read_jsonl(path)
    path.write_text(json.dumps({"run_id": "x"}) + "\n")
    with pytest.raises(StoreError, match="not a run record"):
        read_jsonl(path)
    crafted = {**study()[0].to_dict(), "carried_seconds": "abc", "test_metric": True}
    path.write_text(json.dumps(crafted) + "\n")
    with pytest.raises(StoreError, match=r"study.jsonl:1 has a non-numeric test_metric, carried_seconds"):
        read_jsonl(path)
    line = json.dumps(study()[0].to_dict())
    path.write_text(line.replace('"val_loss": ', '"val_loss": 1e400, "x": ', 1) + "\n")  # parses to inf
    with pytest.raises(StoreError, match=r"study.jsonl:1 is not a JSON line \(1e400 is out of the float range\)"):
        read_jsonl(path)


def test_findings_follow_the_data() -> None:
    cells = list(study_cells(study(lora_shift=0.0)).values())
    assert finding_b(cells).verdict == HOLDS
    assert finding_e(cells).verdict == HOLDS  # structured is 5 points worse on every seed
    assert finding_a(cells).verdict == UNSURE  # no full FT cell
    worse = list(study_cells(study(lora_shift=0.05)).values())
    a = finding_a(worse)
    average = next(e for e in a.evidence if e.startswith("randmask 1e-03 − lora on the average"))
    assert "non-inferior by 1 point: DOES NOT HOLD" in average and "equivalent within ±1: no" in average
    assert any(e.startswith("  rte: randmask 1e-03 − lora") for e in a.evidence)  # per task too
    assert a.verdict == FAILS


@pytest.mark.parametrize("diffs, verdict", [
    ([-0.004, -0.006, -0.005, -0.003, -0.007], HOLDS),  # 0.5 points worse, tightly: not worse by 1 point
    ([-0.02, 0.01, -0.03, 0.015, -0.01], UNSURE),  # the lower bound lies below -1, the upper above it
    ([-0.031, -0.029, -0.030, -0.032, -0.028], FAILS),  # 3 points worse: the upper bound lies below -1
    ([-0.005], UNSURE),  # one seed: no bound
    ([0.02] * 5, UNSURE),  # no spread: a zero-width interval, which would read as certain, measures none
    ([1 / 56 - 3 / 56, 2 / 56 - 4 / 56, 5 / 56 - 7 / 56], UNSURE),  # one difference, to float noise
])
def test_non_inferiority_reads_the_one_sided_bounds(diffs, verdict) -> None:
    from randmask_lab.study.findings import MARGIN, greater_than
    from randmask_lab.study.stats import mean_interval

    assert greater_than(mean_interval(diffs), -MARGIN) == verdict


def test_one_sided_bounds_are_the_t_quantile_at_the_level() -> None:
    from scipy.stats import t as student_t

    from randmask_lab.study.stats import mean_interval

    est = mean_interval([0.1, 0.3, 0.2, 0.4])
    low, high = est.one_sided(0.95)
    half = student_t.ppf(0.95, 3) * est.std / 2
    assert low == pytest.approx(est.mean - half) and high == pytest.approx(est.mean + half)
    assert est.low < low < est.mean < high < est.high  # the one-sided 95% bound is the two-sided 90% one


def test_a_difference_without_spread_gives_no_bounds_and_says_why() -> None:
    from randmask_lab.study.evidence import bounds_text
    from randmask_lab.study.stats import mean_interval

    flat = mean_interval([0.25, 0.25, 0.25])
    assert flat.spread_free and flat.one_sided() is None
    assert bounds_text(flat) == "no one-sided bounds: every seed gives 25.0, a spread of 0, which no verdict reads"
    assert mean_interval([0.25, 0.26]).one_sided() is not None and not mean_interval([0.25]).spread_free


def test_report_from_and_findings_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "study.jsonl"
    export_jsonl(study(), path)
    assert main(["report", "--from", str(path), "--figures", str(tmp_path / "fig")]) == 0
    out = capsys.readouterr().out
    assert "| randmask 1e-03 |" in out and "[" in out and "randmask 1e-03 − lora" in out
    assert (tmp_path / "fig" / "tiny_lr_curves.png").stat().st_size > 0
    assert (tmp_path / "fig" / "tiny_structured.png").stat().st_size > 0
    assert main(["findings", "--from", str(path)]) == 0
    out = capsys.readouterr().out
    assert "(b) the best LR rises monotonically as the ratio falls: HOLDS" in out
    assert "(c)" in out and "INCONCLUSIVE" in out
    assert main(["findings", "--from", str(tmp_path / "missing.jsonl")]) == 2


def test_an_unfinished_search_reads_as_the_best_so_far_and_is_left_out_of_findings() -> None:
    records = study()
    assert findings(list(study_cells(records).values()))[1].verdict == HOLDS
    unfinished = {key for key in study_cells(records) if key[3] == "randmask 1e-05"}
    cells = study_cells(records, unfinished)
    text = study_tables(cells)
    assert "LR search unfinished (best so far @1e-01 of 3 LRs tried)" in text and "@1e-01 |" not in text
    assert "| randmask 1e-05 − lora | LR search unfinished | LR search unfinished | - |" in text
    b = findings(list(cells.values()))[1]  # without the 1e-5 cell the LR ladder cannot be read
    assert b.verdict == UNSURE and "not every ratio has a chosen LR" in b.evidence[0]
    assert b.evidence[-1].startswith("left out, their LR search unfinished")
    assert "randmask 1e-05 (3 LRs" in b.evidence[-1]


def _spec(path: Path, lrs_1e5: list[float], model: str = "tiny") -> Path:
    protocol = {k: PROTOCOL[k] for k in ("n_train", "n_val", "n_test", "epochs")}
    path.write_text(json.dumps({"name": "t", "model": model, "precision": "32", "seeds": [0, 1, 2],
                                "common": {"batch_size": 8, "mode": "lm"},
                                "protocol": {"sst2": protocol, "rte": protocol},
                                "cells": [{"method": "lora", "lrs": [1e-4, 1e-3, 3e-3]},
                                          {"method": "randmask", "ratio": 1e-5, "lrs": lrs_1e5}]}))
    return path


def _spec_ids(records: list[RunRecord], spec_path: Path) -> list[RunRecord]:
    """The spec's ``records`` under the run ids their configs get, on this machine's data: with --spec, a record
    under any other id is stale (``study.run.stale_records``) and left out."""
    from randmask_lab.experiment.run.sources import data_fingerprint
    from randmask_lab.study.plan import StudySpec

    spec = StudySpec.from_file(spec_path)
    return [dataclasses.replace(r, run_id=RunConfig.from_dict(r.config).run_id,
                                data={"fingerprint": data_fingerprint(r.config["task"], None, None)})
            if spec.holds(r) else r for r in records]


def test_report_and_findings_read_the_search_state_from_the_spec(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "study.jsonl"
    finished = _spec(tmp_path / "done.json", [3e-2, 1e-1, 3e-1])
    export_jsonl(_spec_ids(study(), finished), path)
    assert main(["report", "--from", str(path), "--spec", str(finished)]) == 0
    assert "unfinished" not in capsys.readouterr().out.split("Cells:")[0]
    running = _spec(tmp_path / "running.json", [3e-2, 1e-1, 3e-1, 1.0])  # 1.0 not run yet
    assert main(["report", "--from", str(path), "--spec", str(running)]) == 0
    out = capsys.readouterr().out
    assert out.split("####")[0].count("LR search unfinished (best so far @1e-01 of 3 LRs tried)") == 2  # sst2, rte
    assert main(["findings", "--from", str(path), "--spec", str(running)]) == 0
    out = capsys.readouterr().out
    assert "left out, their LR search unfinished" in out and "no --spec" not in out
    other = _spec(tmp_path / "other.json", [1e-1], model="another-model")
    assert main(["findings", "--from", str(path), "--spec", str(other)]) == 2
    assert "no record of" in capsys.readouterr().err
    assert main(["report", "--spec", str(finished)]) == 2
    assert "--spec needs --from" in capsys.readouterr().err


def test_a_rule_waits_for_the_planned_seeds_of_the_cells_it_reads(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    """A fixed-seed design: while the spec plans further seeds of a cell a rule reads, the rule is INCONCLUSIVE
    and says it is interim, even where the numbers so far would decide it; a rule whose cells are complete is
    read as before, and (b), which reads only the LR choices, waits for LR-search runs only."""
    from randmask_lab.study.plan import StudySpec, plan_progress

    path = tmp_path / "study.jsonl"
    worse = study(lora_shift=0.05)
    worse += [record(task, "full", 1e-4, seed, 0.9, 0.5) for task in ("sst2", "rte") for seed in (0, 1, 2)]
    export_jsonl(worse, path)
    assert main(["findings", "--from", str(path)]) == 0
    out = capsys.readouterr().out
    assert "full FT by more than 1 point on the task average (non-inferiority, one-sided 95%): DOES NOT HOLD\n" \
        in out  # no spec: read on what is there, as before, and the reader is told so first
    assert out.startswith("note: no --spec, so every cell is read as finished.")

    spec = json.loads(_spec(tmp_path / "s.json", [3e-2, 1e-1, 3e-1]).read_text())
    spec["cells"].insert(0, {"method": "full", "lrs": [1e-4]})
    spec["seeds"], spec["max_extend"] = [0, 1, 2, 3], 0  # seed 3 of every cell is still planned
    (tmp_path / "s.json").write_text(json.dumps(spec))
    export_jsonl(_spec_ids(worse, tmp_path / "s.json"), path)
    left = plan_progress(StudySpec.from_file(tmp_path / "s.json"), worse).runs_left
    assert left[("sst2", "lora")].total == 1 and left[("sst2", "lora")].search == 0
    assert main(["findings", "--from", str(path), "--spec", str(tmp_path / "s.json")]) == 0
    out = capsys.readouterr().out
    assert "(non-inferiority, one-sided 95%): INCONCLUSIVE, interim (4 planned runs left)" in out
    assert "runs left for rte full (1), rte lora (1), sst2 full (1), sst2 lora (1);" in out
    assert "non-inferior by 1 point: DOES NOT HOLD" in out  # the numbers so far are still shown
    assert "(b) the best LR rises monotonically as the ratio falls: HOLDS\n" in out  # its LR searches are done
    assert "(e) structured masking is worse than random at ≤ 0.01% (random − structured > 0, one-sided 95%): " \
        "INCONCLUSIVE, interim (2 planned runs left)" in out  # it reads randmask 1e-5 too
    assert "-> random − structured > 0: HOLDS" in out and "LR search ends" not in out

    spec["cells"][2]["lrs"] = [3e-2, 1e-1, 3e-1, 1.0]  # randmask 1e-5's search has an LR left: (b) waits too
    (tmp_path / "s.json").write_text(json.dumps(spec))
    assert main(["findings", "--from", str(path), "--spec", str(tmp_path / "s.json")]) == 0
    out = capsys.readouterr().out
    assert "(b) the best LR rises monotonically as the ratio falls: INCONCLUSIVE, interim (2+ planned runs left)" \
        in out and "LR-search runs left for rte randmask 1e-05 (1+), sst2 randmask 1e-05 (1+)" in out


def test_with_its_spec_findings_read_only_the_planned_seeds_of_the_specs_model(tmp_path: Path,
                                                                              capsys: pytest.CaptureFixture) -> None:
    """Seeds run beyond the plan (here 3..30 of LoRA, far better) and another model's records turned an interim
    rule final or printed verdicts under a spec that is not theirs; with --spec both are left out, and said."""
    path = tmp_path / "study.jsonl"
    extra = [record(task, "lora", 1e-3, seed, 0.99, 0.5) for task in ("sst2", "rte") for seed in range(3, 31)]
    other = [dataclasses.replace(r, run_id=r.run_id + "-o", config={**r.config, "model": "other"}) for r in study()]
    spec = _spec(tmp_path / "s.json", [3e-2, 1e-1, 3e-1])
    export_jsonl(_spec_ids(study() + extra + other, spec), path)
    assert main(["findings", "--from", str(path), "--spec", str(spec)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"note: left out {len(other)} records of other at precision 32: --spec {spec} plans tiny")
    assert "note: left out rte lora seeds 3, 4, " in out and "sst2 lora seeds 3, 4, " in out and "## other" not in out
    assert "(3 seeds)" in out and "(31 seeds)" not in out
    assert main(["report", "--from", str(path), "--spec", str(spec)]) == 0
    captured = capsys.readouterr()
    assert "note: left out sst2 lora seeds 3, 4, " in captured.err and "| 99.0" not in captured.out


def test_with_its_spec_a_stale_record_is_left_out_and_its_rerun_read(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    """A record under another id than its run gets now (other data, a changed mask sampler) is planned again;
    findings read it as done meanwhile (a final verdict on a result the study has yet to make), then stopped on
    "two runs at lr, seed" once the rerun landed."""
    spec = _spec(tmp_path / "s.json", [3e-2, 1e-1, 3e-1])
    runs = _spec_ids(study(), spec)
    current = next(r for r in runs if r.config["method"] == "lora" and r.config["seed"] == 2)
    stale = dataclasses.replace(current, run_id=current.run_id[:-10] + "0" * 10)
    path = tmp_path / "study.jsonl"
    export_jsonl([stale if r is current else r for r in runs], path)
    assert main(["findings", "--from", str(path), "--spec", str(spec)]) == 0
    out = capsys.readouterr().out
    assert f"note: left out 1 record made under other code than the spec's runs get now ({stale.run_id})" in out
    assert "interim (1 planned run left)" in out
    export_jsonl(runs + [stale], path)  # the rerun landed beside it
    assert main(["findings", "--from", str(path), "--spec", str(spec)]) == 0
    assert "interim" not in capsys.readouterr().out.split("(b)")[0]
    # As a JSON tool (jq) writes a float that holds a whole number: the same runs, under their own ids.
    export_jsonl([dataclasses.replace(r, config={**r.config, "weight_decay": 0}) for r in runs], path)
    assert main(["findings", "--from", str(path), "--spec", str(spec)]) == 0
    assert "left out" not in capsys.readouterr().out
    beside = record("cb", "lora", 1e-3, 0, 0.7, 0.5)  # a task the spec does not plan: judged by its own config
    beside = dataclasses.replace(beside, run_id=RunConfig.from_dict(beside.config).run_id)
    export_jsonl(runs + [beside], path)
    assert main(["report", "--from", str(path), "--spec", str(spec)]) == 0  # it stopped on KeyError 'cb'
    assert "| CB |" in capsys.readouterr().out
    # Where the data here are not the records' (missing, another copy), an id says nothing of the code: a reader of
    # the study's file still reads its results, told so.
    elsewhere = [dataclasses.replace(r, data={"fingerprint": {"hub": "elsewhere"}}) for r in runs]
    export_jsonl([dataclasses.replace(r, run_id=r.run_id[:-10] + "0" * 10) for r in elsewhere], path)
    assert main(["findings", "--from", str(path), "--spec", str(spec)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("note: the rte, sst2 data here are not the data the records name") and "left out" not in out


def _hessian(folder: Path, ratio: float, seed: int, value: float) -> None:
    folder.mkdir(parents=True)
    run = {"method": "randmask", "ratio": ratio, "n_trainable": 10, "n_total": 1000, "trained": True, "seed": seed}
    (folder / "hessian.json").write_text(json.dumps({"lambda_max": value, "which": "magnitude", "run": run}))


def test_finding_c_pairs_seeds_across_ratios(tmp_path: Path) -> None:
    from randmask_lab.study.findings import finding_c

    # Ten-fold falls in every seed (with some spread in the falls, as a seed's ratios differ by more than a factor):
    # HOLDS.
    for seed, jitter in enumerate((1.0, 1.3, 0.8)):
        for k, (ratio, value) in enumerate(((1e-3, 10.0), (1e-4, 1.0), (1e-5, 0.1))):
            value *= jitter * (1 + 0.1 * k * seed)
            _hessian(tmp_path / "falls" / f"{ratio}" / f"seed{seed}", ratio, seed, value)
    verdict = finding_c([tmp_path / "falls"])
    assert verdict.verdict == HOLDS and "seeds paired" in verdict.evidence[-1]
    # 1e-5 above 1e-4 in every seed: DOES NOT HOLD. One seed each: no interval, INCONCLUSIVE.
    for seed, jitter in enumerate((1.0, 1.3, 0.8)):
        for k, (ratio, value) in enumerate(((1e-3, 10.0), (1e-4, 1.0), (1e-5, 5.0))):
            value *= jitter * (1 + 0.1 * k * seed)
            _hessian(tmp_path / "rises" / f"{ratio}" / f"seed{seed}", ratio, seed, value)
    assert finding_c([tmp_path / "rises"]).verdict == FAILS
    for ratio, value in ((1e-3, 10.0), (1e-4, 1.0)):
        _hessian(tmp_path / "single" / f"{ratio}", ratio, 0, value)
    assert finding_c([tmp_path / "single"]).verdict == UNSURE


def test_paper_rows_sit_beside_ours_and_the_sparsity_curve_is_drawn(tmp_path: Path) -> None:
    from randmask_lab.study.figures import plot_sparsity_curve
    from randmask_lab.study.tables import paper_table, study_tables

    runs = [record("sst2", "randmask", 1e-2, s, 0.8 - r, 0.5, r) for r in (5e-2, 1e-3, 1e-4, 1e-5) for s in (0, 1)]
    runs += [record("sst2", "lora", 1e-3, s, 0.81, 0.5) for s in (0, 1)]
    for r in runs:
        r.trainable, r.total = 10, 1000
    cells = study_cells(runs)
    table = paper_table("tiny", {c.key[3]: {c.key[2]: c} for c in cells.values()})
    lora = next(line for line in table.splitlines() if line.startswith("| lora |"))
    assert "| 86.5 |" in lora and "81.0 ± 0.0" in lora  # the paper's OPT-125m SST-2 LoRA, beside ours
    assert "| randmask 5e-02 | 1% |" in table and "| 87.0 |" in table  # trainable 10 of 1000; the paper's 5% row
    assert "Beside the paper's OPT-125m rows" in study_tables(cells)
    path = plot_sparsity_curve(list(cells.values()), tmp_path / "s.png", "tiny")
    assert path is not None and path.stat().st_size > 0
    assert plot_sparsity_curve(list(cells.values()), tmp_path / "t.png", "tiny", min_ratios=5) is None


def test_a_pending_seed_reestimation_keeps_the_rules_that_read_its_cells_interim() -> None:
    from randmask_lab.study.findings import findings
    from randmask_lab.study.plan import RunsLeft

    left = {("sst2", "lora"): RunsLeft(0, 0, reestimate_pending=True),
            ("sst2", "randmask 1e-03"): RunsLeft(0, 2, reestimate_pending=True)}
    a, b = findings([], runs_left=left)[:2]
    assert a.interim == "2+ planned runs left"
    assert "sst2 lora (0+), sst2 randmask 1e-03 (2+) ('+': more if the seed count is re-estimated upwards)" \
        in a.evidence[-1]
    assert b.interim == ""  # (b) reads LR choices: further seeds never change them


def test_a_collapsed_seed_is_listed_and_stays_in_the_mean() -> None:
    from randmask_lab.study.stats import far_off_seeds

    spread = [0.86, 0.87, 0.865, 0.855, 0.875, 0.86, 0.87, 0.862, 0.868, 0.858]
    tests = dict(enumerate(spread + [0.68]))
    (far,) = far_off_seeds(tests)
    assert far.seed == 10 and far.z < -8
    assert far_off_seeds(dict(enumerate(spread))) == []  # a plain spread lists nothing
    assert far_off_seeds(dict(enumerate([0.86, 0.87, 0.68]))) == []  # too few seeds to measure against
    assert far_off_seeds(dict(enumerate([0.5] * 12))) == []  # no spread (zero-shot): nothing to measure by

    runs = [record("sst2", "lora", 1e-3, s, v, 0.5) for s, v in tests.items()]
    text = study_tables(study_cells(runs))
    assert "Far-off seeds" in text and "seed 10 at 68.0" in text
    assert f"{100 * sum(tests.values()) / len(tests):.1f} ± " in text  # the mean keeps it
    assert "Far-off seeds" not in study_tables(study_cells(runs[:-1]))
    zeroshot = [record("sst2", "zeroshot", 0.0, s, v, 0.5) for s, v in tests.items()]  # a cell without an LR
    assert "sst2, zeroshot: seed 10 at 68.0" in study_tables(study_cells(zeroshot)).replace("SST-2", "sst2")


def test_a_far_off_seed_gets_a_sensitivity_line_and_never_moves_the_rule() -> None:
    """(a) reads every planned seed; where a far-off seed is paired, a line beside it gives the difference without
    it, so a reader sees how much of the interval one run carries (the SmolLM2 study's LoRA seed 15 on SST-2)."""
    spread = [0.86, 0.87, 0.865, 0.855, 0.875, 0.86, 0.87, 0.862, 0.868, 0.858, 0.864]
    runs = []
    for task, offset in (("sst2", 0.0), ("rte", -0.2)):
        for seed, value in enumerate(spread):
            collapsed = task == "sst2" and seed == 10
            runs.append(record(task, "lora", 1e-3, seed, (0.68 if collapsed else value) + offset, 0.5))
            runs.append(record(task, "randmask", 1e-2, seed, value - 0.005 + offset, 0.5, ratio=1e-3))
            runs.append(record(task, "full", 1e-4, seed, value + offset, 0.5))
    a = finding_a(list(study_cells(runs).values()))
    text = a.text()
    sst2 = "      sensitivity, not the rule: without the far-off seeds (lora sst2 seed 10 at 68.0): -0.5 ± "
    assert sst2 in text and "(10 seeds)" in text.split(sst2)[1].split("\n")[0]
    assert text.count("sensitivity, not the rule") == 2  # sst2 and the average, against LoRA only
    average = next(e for e in a.evidence if e.startswith("randmask 1e-03 − lora on the average"))
    assert "(11 seeds)" in average  # the rule keeps the collapsed seed: its interval is the wide one
    clean = [r for r in runs if not (r.config["method"] == "lora" and r.config["seed"] == 10)]
    assert "sensitivity" not in finding_a(list(study_cells(clean).values())).text()


def test_a_seed_far_off_in_two_tasks_names_both_in_the_average_line() -> None:
    spread = [0.86, 0.87, 0.865, 0.855, 0.875, 0.86, 0.87, 0.862, 0.868, 0.858, 0.864]
    runs = []
    for task in ("sst2", "rte"):
        for seed, value in enumerate(spread):
            runs.append(record(task, "lora", 1e-3, seed, 0.68 if seed == 10 else value, 0.5))
            runs.append(record(task, "randmask", 1e-2, seed, value, 0.5, ratio=1e-3))
    average = next(e for e in finding_a(list(study_cells(runs).values())).evidence
                   if e.startswith("  sensitivity") and "seed 10" in e)
    assert "lora rte seed 10 at 68.0, lora sst2 seed 10 at 68.0" in average


def _on(r: RunRecord, cpu: str) -> RunRecord:
    r.machine = {"cpu_model": cpu, "cpu_kind": "AVX512/bf16", "device": "cpu"}
    return r


def test_a_and_e_say_where_each_pair_ran_and_never_move_the_rule() -> None:
    """A seed whose two paired runs were computed on different machines is counted, and a sensitivity line gives
    the difference without such seeds; the rule reads every seed. Records that name no machine print nothing."""
    spread = [0.86, 0.87, 0.865, 0.855, 0.875, 0.86, 0.87, 0.862, 0.868, 0.858, 0.864]
    runs = []
    for seed, value in enumerate(spread):
        moved = seed >= 8  # LoRA's last three seeds ran on another machine
        runs.append(_on(record("sst2", "lora", 1e-3, seed, value + 0.01 * moved, 0.5), "B" if moved else "A"))
        runs.append(_on(record("sst2", "randmask", 1e-2, seed, value, 0.5, ratio=1e-3), "A"))
        runs.append(_on(record("sst2", "full", 1e-4, seed, value, 0.5), "A"))
        for method in ("randmask", "structured"):
            runs.append(_on(record("sst2", method, 3e-2, seed, value, 0.5, ratio=1e-4), "A"))
    a = finding_a(list(study_cells(runs).values()))
    assert a.evidence[-4] == "  machines: a seed's two runs ran on one machine in sst2 8 of 11 seeds"
    assert a.evidence[-3].startswith("  sensitivity, not the rule: without the seeds whose two runs ran on different "
                                     "machines (sst2 seeds 8, 9, 10 on A (AVX512/bf16) / B (AVX512/bf16)): ")
    assert "(8 seeds)" in a.evidence[-3]
    assert "(11 seeds)" in next(e for e in a.evidence if "on the average" in e and "lora" in e)  # the rule: all
    assert a.evidence[-1] == "  machines: a seed's two runs ran on one machine in sst2 11 of 11 seeds"  # vs full
    e = finding_e(list(study_cells(runs).values()))
    assert e.evidence[-1] == "  machines: a seed's two runs ran on one machine in sst2 1e-04 11 of 11 seeds"
    for r in runs:
        r.machine = {}
    assert "machines" not in finding_a(list(study_cells(runs).values())).text()


def test_a_cell_whose_runs_differ_in_a_setting_or_repeat_a_seed_is_refused():
    """A study averages a cell's runs as seeds of one setting: runs of two settings (a merge of two studies) were
    pooled, and a second run at one LR and seed silently replaced the first."""
    runs = [record("sst2", "lora", 1e-3, s, 0.8, 0.5) for s in (0, 1)]
    assert study_cells(runs)  # one setting, distinct seeds
    runs[1].config["method_options"] = {"r": 16}
    with pytest.raises(StoreError, match=r"differ in \['method_options'\]: they are not seeds of one cell"):
        study_cells(runs)
    runs[1].config["method_options"] = {}
    runs[1].config["weight_decay"] = 0  # as jq writes 0.0: one number, so one setting
    runs[1].config["adam_betas"] = [0.9, 0.999]
    assert study_cells(runs)
    runs[1].config["weight_decay"] = False  # a bool is not the number 0
    with pytest.raises(StoreError, match=r"differ in \['weight_decay'\]"):
        study_cells(runs)
    twice = [record("sst2", "lora", 1e-3, 0, 0.8, 0.5), record("sst2", "lora", 1e-3, 0, 0.7, 0.5)]
    twice[1].run_id += "-other-data"
    with pytest.raises(StoreError, match="two runs at lr 0.001, seed 0"):
        study_cells(twice)


def _chain(*searches: dict[float, float]) -> list:
    """One task's randmask cells at 1e-3, 1e-4, 1e-5, each from its LR search (LR -> validation loss, seed 0)."""
    runs = [record("sst2", "randmask", lr, 0, 0.8, loss, ratio)
            for ratio, search in zip((1e-3, 1e-4, 1e-5), searches) for lr, loss in search.items()]
    return list(study_cells(runs).values())


@pytest.mark.parametrize("searches, verdict", [
    # interior choices 1e-2, 3e-2, 1e-1: a rise
    (({3e-3: 0.6, 1e-2: 0.5, 3e-2: 0.6}, {1e-2: 0.6, 3e-2: 0.5, 1e-1: 0.6}, {3e-2: 0.6, 1e-1: 0.5, 3e-1: 0.6}), HOLDS),
    # 1e-4 at its LOW edge 1e-3, below 1e-3's interior 1e-2: its best is at most 1e-3, a sure fall
    (({3e-3: 0.6, 1e-2: 0.5, 3e-2: 0.6}, {1e-3: 0.5, 3e-3: 0.6, 1e-2: 0.7}, {3e-2: 0.6, 1e-1: 0.5, 3e-1: 0.6}), FAILS),
    # 1e-4 at its HIGH edge 1e-1, which 1e-5 also chose: its best may lie above 1e-1, a fall not ruled out
    (({3e-3: 0.6, 1e-2: 0.5, 3e-2: 0.6}, {1e-2: 0.7, 3e-2: 0.6, 1e-1: 0.5}, {3e-2: 0.6, 1e-1: 0.5, 3e-1: 0.6}), UNSURE),
    # 1e-3 at its HIGH edge 3e-2 and 1e-4 below it in the interior: a sure fall
    (({3e-3: 0.7, 1e-2: 0.6, 3e-2: 0.5}, {3e-3: 0.6, 1e-2: 0.5, 3e-2: 0.6}, {3e-2: 0.6, 1e-1: 0.5, 3e-1: 0.6}), FAILS),
    # 1e-5 at its HIGH edge, above the rest: an edge pointing away from the others changes nothing
    (({3e-3: 0.6, 1e-2: 0.5, 3e-2: 0.6}, {1e-2: 0.6, 3e-2: 0.5, 1e-1: 0.6}, {3e-2: 0.7, 1e-1: 0.6, 3e-1: 0.5}), HOLDS),
    # 1e-3 and 1e-4 both at their LOW edge 3e-3: no order known between them
    (({3e-3: 0.5, 1e-2: 0.6}, {3e-3: 0.5, 1e-2: 0.6}, {3e-2: 0.6, 1e-1: 0.5, 3e-1: 0.6}), UNSURE),
    # 1e-3 at its LOW edge 1e-2, which 1e-4 chose inside its grid: 1e-3's best is at most 1e-2, a sure tie or rise
    (({1e-2: 0.5, 3e-2: 0.6}, {3e-3: 0.6, 1e-2: 0.5, 3e-2: 0.6}, {3e-2: 0.6, 1e-1: 0.5, 3e-1: 0.6}), HOLDS),
    # 1e-4 at its HIGH edge 1e-2, which 1e-3 chose inside its grid: a sure tie or rise from 1e-3, but 1e-4's best
    # may lie above 1e-5's 1e-1, a fall not ruled out
    (({3e-3: 0.6, 1e-2: 0.5, 3e-2: 0.6}, {3e-3: 0.6, 1e-2: 0.5}, {3e-2: 0.6, 1e-1: 0.5, 3e-1: 0.6}), UNSURE),
])
def test_finding_b_reads_a_grid_edge_by_the_way_it_points(searches, verdict) -> None:
    """An edge LR says the best lies at or beyond it: a fall it cannot undo is a fall (it read INCONCLUSIVE), and a
    tie or rise it could undo is not read (it read HOLDS)."""
    b = finding_b(_chain(*searches))
    assert b.verdict == verdict, b.text()
