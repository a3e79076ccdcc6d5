"""The report's marks on cells that are not plain results: seeds without a test result at the chosen LR, an LR
search unfinished with every run so far diverged, a plan with runs left (interim), and a study ratio that stands
beside another of the paper's (4.9% beside 5%), in the tables and on the sparsity curve."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from randmask_lab.experiment.results.record import RunRecord
from randmask_lab.study.cells import study_cells
from randmask_lab.study.plan import CellSpec, RunsLeft, StudySpec, plan_progress
from randmask_lab.study.tables import paper_table, study_tables

PROTOCOL = {"n_train": 64, "n_val": 32, "n_test": 64, "epochs": 2, "batch_size": 8, "mode": "lm"}
GRIDS = {("lora", None): (1e-4, 1e-3, 3e-3), ("randmask", 1e-3): (1e-3, 1e-2, 3e-2),
         ("randmask", 1e-4): (1e-2, 3e-2, 1e-1), ("randmask", 4.9e-2): (1e-4, 3e-4, 1e-3),
         ("randmask", 5e-4): (3e-3, 1e-2, 3e-2), ("randmask", 1e-2): (3e-4, 1e-3, 3e-3)}


def record(task: str, method: str, lr: float, seed: int, test: float, val: float, ratio: float | None = None,
           status: str = "done") -> RunRecord:
    config = {"model": "tiny", "task": task, "method": method, "ratio": ratio, "density": None, "lr": lr,
              "seed": seed, **PROTOCOL}
    r = RunRecord(run_id=f"{task}-{method}-{ratio}-{lr}-{seed}", config=config, status=status, metric="accuracy",
                  val_loss=val if status == "done" else None, test_metric=test if status == "done" else None)
    r.trainable, r.total = 10, 1000
    return r


def cell_runs(task: str, method: str, ratio: float | None, seeds: tuple[int, ...] = (0, 1, 2),
              failed: dict[int, str] | None = None, base: float = 0.8) -> list[RunRecord]:
    """An LR search on seed 0 (the middle LR best), then ``seeds`` at it; ``failed``: seed -> status there."""
    grid = GRIDS[(method, ratio)]
    best = grid[1]
    runs = [record(task, method, lr, 0, base - abs(math.log10(lr / best)) / 10, 0.5 + abs(math.log10(lr / best)),
                   ratio, (failed or {}).get(0, "done") if lr == best else "done") for lr in grid]
    runs += [record(task, method, best, s, base + 0.01 * s, 0.5, ratio, (failed or {}).get(s, "done"))
             for s in seeds if s != 0]
    return runs


def line(text: str, start: str) -> str:
    return next(row for row in text.splitlines() if row.startswith(start))


def test_a_seed_without_a_test_result_is_counted_and_named() -> None:
    runs = cell_runs("sst2", "randmask", 1e-3, failed={2: "diverged"}) + cell_runs("sst2", "lora", None)
    runs += cell_runs("rte", "randmask", 1e-3) + cell_runs("rte", "lora", None)
    text = study_tables(study_cells(runs))
    row = line(text, "| randmask 1e-03 |")
    assert "(n=2 of 3: seed 2 diverged)" in row  # the SST-2 cell averages two of its three seeds
    assert row.endswith("(n=2; seed 2 diverged in SST-2) |")  # the per-seed task average leaves seed 2 out too
    diff = line(text, "| randmask 1e-03 − lora |")
    assert "(n=2; seed 2 diverged in randmask 1e-03)" in diff and diff.count("seed 2 diverged") == 2
    assert "(n=" not in line(text, "| lora |")  # a cell with every seed in reads as before
    assert "seeds that finished without a test result at the chosen LR" in text.splitlines()[-1]


def test_one_surviving_seed_states_n_once() -> None:
    runs = cell_runs("sst2", "randmask", 1e-3, seeds=(0, 1), failed={1: "scale_collapsed"})
    row = line(study_tables(study_cells(runs)), "| randmask 1e-03 |")
    assert "(n=1 of 2: seed 1 scale_collapsed)" in row and "(n=1) @" not in row


def test_an_unfinished_search_whose_runs_all_diverged_reads_unfinished() -> None:
    runs = [record("cb", "randmask", 3e-1, 0, 0.0, 0.0, 1e-4, status="diverged")]
    key = next(iter(study_cells(runs)))
    text = study_tables(study_cells(runs, unfinished={key}))
    assert "| randmask 1e-04 | LR search unfinished (1 LR tried, diverged) |" in text
    assert "| diverged |" not in text
    # without the spec nothing says the search goes on: the cell reads as it always did
    assert "| randmask 1e-04 | diverged |" in study_tables(study_cells(runs))


def spec(seeds: tuple[int, ...] = (0, 1, 2)) -> StudySpec:
    return StudySpec("marks", "tiny", "32", {"sst2": PROTOCOL},
                     [CellSpec("lora", GRIDS[("lora", None)]), CellSpec("randmask", GRIDS[("randmask", 1e-3)], 1e-3)],
                     seeds=seeds)


def test_a_cell_the_plan_has_runs_left_for_is_marked_interim() -> None:
    runs = cell_runs("sst2", "randmask", 1e-3) + cell_runs("sst2", "lora", None)
    planned = spec(seeds=tuple(range(10)))
    left = plan_progress(planned, runs).runs_left  # the plan's own count, as findings reads it
    assert left[("sst2", "randmask 1e-03")] == RunsLeft(0, 7)
    text = study_tables(study_cells(runs), {"tiny": left})
    assert "(interim: 7 planned runs left) |" in line(text, "| randmask 1e-03 |")
    assert "(interim)" in line(text, "| randmask 1e-03 − lora |")
    assert "the study's plan has runs left for the cell" in text.splitlines()[-1]
    # the same records under a plan they complete: no mark, and the output is the one without a plan
    done = plan_progress(spec(), runs).runs_left
    assert done == {} and study_tables(study_cells(runs), {"tiny": done}) == study_tables(study_cells(runs))


def test_interim_says_more_follow_while_the_search_or_a_reestimation_may_add_runs() -> None:
    runs = cell_runs("sst2", "randmask", 1e-3, seeds=(0,))
    text = study_tables(study_cells(runs), {"tiny": {("sst2", "randmask 1e-03"): RunsLeft(0, 2, True)}})
    assert "(n=1) @1e-02 (interim: 2+ planned runs left)" in text


def test_the_papers_5_percent_row_stands_beside_4_9_percent() -> None:
    from randmask_lab.study.tables import paper_label, paper_ratio  # the one mapping the sparsity curve uses too

    assert paper_ratio(4.9e-2) == 5e-2 and paper_ratio(1e-3) == 1e-3 and paper_ratio(4e-2) is None
    assert paper_label("randmask 4.9e-02") == "randmask 5e-02" and paper_label("lora") == "lora"
    assert paper_label("randmask 1e-03 nf4") == "randmask 1e-03 nf4"  # a quantized row has no paper row
    cells = study_cells(cell_runs("sst2", "randmask", 4.9e-2) + cell_runs("sst2", "randmask", 1e-3))
    table = paper_table("tiny", {c.key[3]: {c.key[2]: c} for c in cells.values()})
    row = line(table, "| randmask 4.9e-02 |")
    assert row.endswith("| 87.0 |")  # the paper's SST-2 5% row
    assert "randmask 4.9e-02 beside randmask 5e-02" in table.splitlines()[-1]
    assert "beside randmask" not in paper_table("tiny", {"randmask 1e-03": {"sst2": next(
        c for c in cells.values() if c.ratio == 1e-3)}})  # no stand-in, no sentence


@pytest.fixture()
def drawn(monkeypatch: pytest.MonkeyPatch) -> list[tuple[object, str]]:
    """The figures the plots would save, with their captions, instead of PNGs."""
    from randmask_lab.study import figures

    saved: list[tuple[object, str]] = []
    monkeypatch.setattr(figures, "_save", lambda fig, path, title: saved.append((fig, title)) or Path(path))
    return saved


def _legend(fig: object) -> list[str]:
    return [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]


def test_the_sparsity_curve_never_bridges_a_missing_ratio_silently(drawn: list) -> None:
    from randmask_lab.study.figures import curve_joins, plot_sparsity_curve

    runs = [r for ratio in (4.9e-2, 1e-2, 1e-3, 1e-4) for r in cell_runs("sst2", "randmask", ratio)]
    runs += [record("sst2", "randmask", lr, 0, 0.0, 0.0, 5e-4, "diverged") for lr in GRIDS[("randmask", 5e-4)]]
    cells = list(study_cells(runs).values())
    points = [c for c in cells if c.tests]
    gaps = {(a.ratio, b.ratio): between for a, b, between in curve_joins(points, cells)}
    assert gaps[(1e-4, 1e-3)] == [5e-4]  # every LR of 5e-4 diverged: a ratio the study has, with no result
    assert gaps[(1e-3, 1e-2)] == [5e-3]  # a ratio on the paper's ladder the study has none at
    assert gaps[(1e-2, 4.9e-2)] == []  # 4.9% stands for the paper's 5% (the table's mapping): nothing between
    assert plot_sparsity_curve(cells, "s.png", "tiny") is not None
    assert any("across 0.05%, 0.5%, no result here" in text for text in _legend(drawn[-1][0]))


def test_the_figures_label_a_failed_seed_and_a_single_seed(drawn: list) -> None:
    from randmask_lab.study.figures import plot_lr_curves, plot_sparsity_curve

    runs = cell_runs("sst2", "randmask", 4.9e-2, failed={2: "diverged"}) + cell_runs("sst2", "randmask", 1e-2)
    runs += cell_runs("sst2", "randmask", 1e-3, seeds=(0,)) + cell_runs("sst2", "randmask", 1e-4)
    cells = list(study_cells(runs).values())
    for plot in (plot_sparsity_curve, plot_lr_curves):
        plot(cells, "s.png", "tiny")
        fig, caption = drawn[-1]
        notes = [t.get_text() for ax in fig.axes for t in ax.texts]
        assert "n=2 of 3: seed 2 diverged" in notes and "n=1" in notes, plot
        assert "finished without a test result" in caption
