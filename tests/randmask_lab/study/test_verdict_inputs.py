"""Record files that once gave a verdict silently wrong: each is now read right or refused in one line."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from randmask_lab.cli import main
from randmask_lab.errors import RunError, StoreError
from randmask_lab.experiment.results.record import RunRecord
from randmask_lab.study.cells import study_cells
from randmask_lab.study.findings import HOLDS, UNSURE, finding_a, finding_e
from randmask_lab.study.records import export_jsonl
from randmask_lab.study.tables import study_tables

PROTOCOL = {"n_train": 64, "n_val": 32, "n_test": 64, "epochs": 2, "batch_size": 8, "mode": "lm"}
CELLS = (("lora", None, 0.80), ("full", None, 0.80), ("randmask", 1e-3, 0.80),
         ("randmask", 1e-4, 0.80), ("structured", 1e-4, 0.70))


def run(task: str, method: str, ratio: float | None, seed: int, test: float | None, status: str = "done",
        lr: float = 1e-3, n_test: int = 64, val: float = 0.5) -> RunRecord:
    config = {"model": "tiny", "task": task, "method": method, "ratio": ratio, "density": None, "lr": lr,
              "seed": seed, **PROTOCOL, "n_test": n_test}
    return RunRecord(run_id=f"{task}-{method}-{ratio}-{lr}-{seed}-{n_test}", config=config, status=status,
                     metric="accuracy", val_loss=val if status == "done" else None,
                     test_metric=test if status == "done" else None)


def records(seeds: int = 8, n_test: int = 64) -> list[RunRecord]:
    """Two tasks, as a study runs them: the LR search on seed 0 (1e-2 loses to 1e-3), then the other seeds at the
    chosen 1e-3. randmask 1e-3 and 1e-4 as good as LoRA and full (to within 0.1 point), structured 10 points worse:
    (a) and (e) HOLD."""
    return [run(task, method, ratio, s, base + 0.001 * (s * (k + 1) % 3), n_test=n_test) for task in ("sst2", "cb")
            for k, (method, ratio, base) in enumerate(CELLS) for s in range(seeds)] + [
        run(task, method, ratio, 0, base - 0.1, lr=1e-2, n_test=n_test, val=0.9) for task in ("sst2", "cb")
        for method, ratio, base in CELLS]


def with_failed(rows: list[RunRecord], method: str, seeds: set[int], status: str) -> list[RunRecord]:
    """``rows`` with ``method``'s runs at ``seeds`` on cb ended as ``status`` (no test metric)."""
    return [dataclasses.replace(r, status=status, val_loss=None, test_metric=None)
            if r.config["method"] == method and r.config["task"] == "cb" and r.config["seed"] in seeds else r
            for r in rows]


def test_the_inputs_decide_when_nothing_is_wrong() -> None:
    cells = list(study_cells(records()).values())
    assert finding_a(cells).verdict == HOLDS and finding_e(cells).verdict == HOLDS


@pytest.mark.parametrize("method, finding", [("randmask", finding_a), ("structured", finding_e)])
@pytest.mark.parametrize("status", ["diverged", "scale_collapsed"])
def test_a_seed_whose_run_failed_at_the_chosen_lr_is_named_and_the_rule_is_not_read(method, finding, status):
    # Without the fix the failed seeds were left out of the difference silently (scale_collapsed runs were not even
    # read) and the rule HOLDS on the seeds that finished, though the plan counts the failed ones as run.
    cells = list(study_cells(with_failed(records(), method, {2, 5}, status)).values())
    verdict = finding(cells)
    assert verdict.verdict == UNSURE
    line = next(e for e in verdict.evidence if "not read:" in e)
    assert f"cb seeds 2, 5 ({status})" in line and "INCONCLUSIVE" in line


@pytest.mark.parametrize("method, finding", [("lora", finding_a), ("structured", finding_e)])
def test_a_cell_that_failed_at_every_lr_is_named_and_the_rule_is_not_read(method, finding) -> None:
    """Its cell has no chosen LR, so no seed: the task average (and (e)'s pooled one) kept the seeds every cell has,
    none, and the rule read "no shared seed" with nothing naming the cell."""
    rows = [dataclasses.replace(r, status="diverged", val_loss=None, test_metric=None)
            if r.config["method"] == method and r.config["task"] == "cb" else r for r in records()]
    verdict = finding(list(study_cells(rows).values()))
    assert verdict.verdict == UNSURE
    line = next(e for e in verdict.evidence if "not read:" in e)
    assert line.startswith(f"  not read: cb {method}") and "any LR it tried (0.001, 0.01; diverged)" in line


def test_a_task_and_method_in_two_protocols_is_refused_not_read_on_either() -> None:
    # Without the fix the cells collided by task and method label, and the last one read (here a 40-example test
    # set at 0 accuracy) silently decided (a): "randmask − lora +80 points, HOLDS".
    rows = records() + [r for r in records(n_test=40) if r.config["task"] == "cb" and r.config["method"] == "lora"]
    rows = [dataclasses.replace(r, test_metric=0.0) if r.config["n_test"] == 40 else r for r in rows]
    with pytest.raises(RunError, match="cb lora runs come in two protocols"):
        finding_a(list(study_cells(rows).values()))


def test_the_table_average_never_counts_a_task_of_two_protocols_twice() -> None:
    rows = records() + [r for r in records(n_test=40) if r.config["task"] == "cb" and r.config["method"] == "lora"]
    rows = [dataclasses.replace(r, test_metric=0.0) if r.config["n_test"] == 40 else r for r in rows]
    table = study_tables(study_cells(rows))
    lora = next(line for line in table.splitlines() if line.startswith("| lora |"))
    assert lora.rstrip(" |").endswith("-")  # without the fix: (80 + 0 + 80) / 3 = 53.4, CB counted twice


def test_a_stray_lr_that_shares_no_seed_is_refused_in_one_line(tmp_path: Path, capsys) -> None:
    # Without the fix the cell's LRs had no common seed, every mean search loss was empty (inf), and the cell read
    # as all-diverged: (a) said "no shared seed" for LoRA and the table "diverged", for runs that were all fine.
    rows = records() + [run("cb", "lora", None, 3, 0.8, lr=2e-2)]
    with pytest.raises(StoreError, match=r"lr 0.02 ran at seed 3 only"):
        study_cells(rows)
    path = tmp_path / "study.jsonl"
    export_jsonl(rows, path)
    assert main(["findings", "--from", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "share no seed" in err


@pytest.mark.parametrize("field", ["data_seed", "order_seed"])
def test_a_seed_run_on_another_draw_than_its_pair_is_refused_in_one_line(field: str, tmp_path: Path, capsys) -> None:
    # Without the check every LoRA seed trained on seed 0's examples (or order) and was paired silently with
    # randmask's seed s on its own: a "paired" difference of unlike draws, read as HOLDS.
    rows = [dataclasses.replace(r, config={**r.config, field: 0})
            if r.config["method"] == "lora" and r.config["task"] == "sst2" else r for r in records()]
    what = "examples" if field == "data_seed" else "training order"
    with pytest.raises(StoreError, match=rf"task sst2: seed 1 drew its {what} with {field} 0 in run sst2-lora"):
        study_cells(rows)
    path = tmp_path / "study.jsonl"
    export_jsonl(rows, path)
    assert main(["findings", "--from", str(path)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_one_draw_set_for_every_cell_of_a_task_still_pairs() -> None:
    # data_seed fixed for all runs of a task (a study of training noise on one data subset): every seed of every
    # cell drew the same examples, so the pairing holds and the rules are read.
    rows = [dataclasses.replace(r, config={**r.config, "data_seed": 7}) for r in records()]
    cells = list(study_cells(rows).values())
    assert finding_a(cells).verdict == HOLDS


def test_a_zero_shot_row_beside_cells_trained_in_one_fixed_order_still_pairs() -> None:
    # Every trained cell ran one fixed order (order_seed 7), beside a zero-shot row: zero-shot refuses --order-seed
    # (it trains nothing), so its records keep it unset. Without the exemption the file was refused, with a fix no
    # zero-shot record can follow.
    rows = [dataclasses.replace(r, config={**r.config, "order_seed": 7}) for r in records()]
    zero = [run(task, "zeroshot", None, s, 0.5) for task in ("sst2", "cb") for s in range(8)]
    cells = list(study_cells(rows + zero).values())
    assert finding_a(cells).verdict == HOLDS
    wrong_data = [dataclasses.replace(zero[0], config={**zero[0].config, "data_seed": 3})]
    with pytest.raises(StoreError, match="drew its examples with data_seed"):  # its test sample still pairs by seed
        study_cells(rows + zero[1:] + wrong_data)
