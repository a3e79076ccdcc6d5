"""Best-LR tables: LR chosen on validation, test metric reported, divergence handled."""

from __future__ import annotations

from randmask_lab.experiment.results.record import RunRecord
from randmask_lab.experiment.results.report import best_cell, best_runs, report_tables
from randmask_lab.experiment.run.config import RunConfig

from .test_store import record


def test_lr_is_chosen_by_mean_validation_loss_over_seeds():
    runs = [record(lr=1e-3, seed=s, val_loss=0.5, test_metric=0.70) for s in (0, 1)]
    runs += [record(lr=1e-2, seed=s, val_loss=0.4, test_metric=t) for s, t in ((0, 0.60), (1, 0.62))]
    cell = best_cell(runs, "val_loss")
    assert cell.lr == 1e-2 and cell.tests == [0.60, 0.62]
    assert cell.text() == "61.0 ±1.4 (1e-02)"
    by_metric = best_cell([*runs[:2], record(lr=1e-2, val_metric=0.5)], "val_metric")
    assert by_metric.lr == 1e-3  # validation accuracy 0.7 beats 0.5


def test_seeds_added_at_one_lr_do_not_move_the_choice():
    # A study: seed 0 over the grid, seeds 1 and 2 only at the chosen LR (and worse there on validation).
    runs = [record(lr=1e-3, seed=0, val_loss=0.50), record(lr=1e-2, seed=0, val_loss=0.45, test_metric=0.8)]
    runs += [record(lr=1e-2, seed=s, val_loss=0.70, test_metric=0.7) for s in (1, 2)]
    cell = best_cell(runs)
    assert cell.lr == 1e-2 and len(cell.tests) == 3  # over all seeds the mean (0.62) would pick 1e-3


def test_a_diverged_seed_disqualifies_its_lr():
    runs = [record(lr=1e-1, val_loss=0.1), record(lr=1e-1, seed=1, status="diverged", val_loss=None),
            record(lr=1e-3, val_loss=0.9, test_metric=0.55)]
    assert best_cell(runs).lr == 1e-3
    only = best_cell([record(status="diverged", val_loss=None, test_metric=None)])
    assert only.text() == "diverged"


def test_markdown_table_has_methods_tasks_and_average():
    runs = [record(task="rte"), record(task="sst2", test_metric=0.9)]
    text = report_tables(runs)
    assert "| Method | Params | SST-2 | RTE | Avg |" in text
    assert "| randmask 1e-03 | 1% | 90.0 (1e-03) | 60.0 (1e-03) | 75.0 |" in text
    assert "validation loss" in text
    assert report_tables([]) == "No finished runs in the store."


def test_zero_shot_row_comes_first_and_shows_no_lr():
    zero = record(test_metric=0.55)
    zero.config.update(method="zeroshot", ratio=None)
    text = report_tables([zero, record(test_metric=0.9)])
    rows = [line for line in text.splitlines() if line.startswith("| ") and "Method" not in line]
    assert rows[0].startswith("| zeroshot |") and "| 55.0 |" in rows[0]
    assert rows[1].startswith("| randmask 1e-03 |")


def test_a_ratio_label_never_rounds_one_budget_to_anothers_name():
    """SmolLM2 caps the paper's even spread at 4.93%: its 4.9% cell must not be labelled (and put beside the paper's
    row) as 5e-02."""
    from randmask_lab.experiment.results.report import method_label, ratio_text

    assert [ratio_text(r) for r in (1e-3, 5e-5, 4.9e-2, 0.0493)] == ["1e-03", "5e-05", "4.9e-02", "4.93e-02"]
    assert method_label({"method": "randmask", "ratio": 4.9e-2}) == "randmask 4.9e-02"
    assert method_label({"method": "structured", "ratio": 1e-4}) == "structured 1e-04"


def _with(seed: int = 0, test_metric: float = 0.6, **config) -> RunRecord:
    """A LoRA run of ``record``'s cell with other settings (a new run id, as the run's identity changes)."""
    run = RunConfig(model="m", task="rte", method="lora", lr=1e-3, seed=seed, **config)
    return RunRecord(run.run_id, run.to_dict(), "done", "accuracy", val_loss=0.5, val_metric=0.7,
                     test_metric=test_metric, best_epoch=2, trainable=10, total=1000)


def test_runs_of_other_settings_are_other_rows_never_seeds_of_one():
    """LoRA r=1 and r=16, both seed 0, were one cell "87.5 ±17.7": two settings averaged as two seeds."""
    r1, r16 = _with(method_options={"r": 1}, test_metric=1.0), _with(method_options={"r": 16}, test_metric=0.75)
    rows = [line for line in report_tables([r1, r16]).splitlines() if line.startswith("| lora")]
    assert rows == ['| lora [method_options={"r":1}] | 1% | 100.0 (1e-03) |',
                    '| lora [method_options={"r":16}] | 1% | 75.0 (1e-03) |']
    assert [r.run_id for r in best_runs([r1, r16])] == [r1.run_id, r16.run_id]  # one per cell, not one of both
    same = [_with(seed=s, weight_decay=0.1) for s in (0, 1)]  # agreeing settings keep the plain label
    assert "| lora | 1% | 60.0 ±0.0 (1e-03) |" in report_tables(same)
    rewritten = _with(seed=4, method_options={"r": 8})
    rewritten.config.update(weight_decay=0, method_options={"r": 8.0})  # a JSON tool's rewrite: the same numbers
    assert "| lora | 1% | 60.0 ±0.0 (1e-03) |" in report_tables([_with(seed=3, method_options={"r": 8}), rewritten])
    older = _with(seed=2)
    older.config.pop("world_size")  # a record made before the field existed ran at its default
    assert "| lora | 1% | 60.0 ±0.0 (1e-03) |" in report_tables([_with(seed=3), older])


def test_the_settings_table_names_every_identity_field_outside_the_cell_key():
    """results/ cannot import run/, so the settings table is written out: a new identity field must be added."""
    import dataclasses

    from randmask_lab.experiment.results.settings import IN_CELL_KEY, SETTING_DEFAULTS
    from randmask_lab.experiment.run.config import IDENTITY, OMITTED_AT_DEFAULT, ROLE, STORED_NAMES

    expected = {}
    for f in dataclasses.fields(RunConfig):
        name = STORED_NAMES.get(f.name, f.name)
        if f.metadata.get(ROLE) == IDENTITY[ROLE] and name not in IN_CELL_KEY:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            expected[name] = OMITTED_AT_DEFAULT.get(name, list(default) if isinstance(default, tuple) else default)
    assert SETTING_DEFAULTS == expected
