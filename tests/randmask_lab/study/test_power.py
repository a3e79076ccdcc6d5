"""The power calculation: seeds for a half-width and for a one-sided bound, read off the t distribution."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
from scipy.stats import t as student_t
from test_study import record  # this folder is on sys.path (no __init__.py)

from randmask_lab.experiment.results.record import RunRecord
from randmask_lab.study.cells import study_cells
from randmask_lab.study.power import (
    power_table,
    seeds_for_half_width,
    seeds_for_lower_bound,
    seeds_for_power,
    seeds_for_upper_bound,
)


@pytest.mark.parametrize("sd", [0.005, 0.0127, 0.03])
def test_half_width_seeds_are_the_smallest_that_fit(sd: float) -> None:
    n = seeds_for_half_width(sd, 0.01)
    width = lambda k: student_t.ppf(0.975, k - 1) * sd / math.sqrt(k)
    assert width(n) <= 0.01 and (n == 2 or width(n - 1) > 0.01)


def test_one_sided_seeds_and_out_of_reach() -> None:
    n = seeds_for_lower_bound(0.005, 0.01, -0.01)
    low = lambda k: 0.005 - student_t.ppf(0.95, k - 1) * 0.01 / math.sqrt(k)
    assert low(n) > -0.01 and low(n - 1) <= -0.01
    assert seeds_for_lower_bound(-0.02, 0.01, -0.01) is None  # the mean is already past the bound
    assert seeds_for_half_width(10.0, 0.01) is None  # beyond any affordable count


def test_a_mean_below_the_bound_gives_the_seeds_that_decide_against() -> None:
    n = seeds_for_upper_bound(-0.0313, 0.0309, -0.01)  # the confirm study's SST-2 + CB randmask - full, at 10 seeds
    high = lambda k: -0.0313 + student_t.ppf(0.95, k - 1) * 0.0309 / math.sqrt(k)
    assert high(n) < -0.01 and high(n - 1) >= -0.01
    assert seeds_for_upper_bound(0.0, 0.01, -0.01) is None  # above the bound: only the lower bound can decide
    assert seeds_for_upper_bound(-0.01, 0.01, -0.01) is None and seeds_for_lower_bound(-0.01, 0.01, -0.01) is None

    runs = []
    for seed, (rm, full) in enumerate([(0.80, 0.83), (0.79, 0.83), (0.81, 0.83), (0.80, 0.84)]):
        runs += [record("sst2", "randmask", 1e-2, seed, rm, 0.5, 1e-3), record("sst2", "full", 1e-4, seed, full, 0.5)]
    (row,) = power_table(list(study_cells(runs).values()))
    assert row.one_sided is None and row.one_sided_against == seeds_for_upper_bound(
        row.measured.mean, row.measured.std, -0.01)
    assert row.text(0.01).endswith(f"at this mean: out of reach (its upper bound < -1, which decides against it: "
                                   f"{row.one_sided_against}, {row.powered_against} for 80% power)")


def test_power_table_pairs_seeds_and_names_each_comparison() -> None:
    runs = []
    for seed, (rm, lo) in enumerate([(0.80, 0.79), (0.82, 0.80), (0.81, 0.82), (0.83, 0.81)]):
        runs += [record("sst2", "randmask", 1e-2, seed, rm, 0.5, 1e-3), record("sst2", "lora", 1e-3, seed, lo, 0.5)]
    (row,) = power_table(list(study_cells(runs).values()))
    assert row.name == "sst2: randmask 1e-03 − lora" and row.measured.n == 4 and row.bound == -0.01
    assert row.half_width == seeds_for_half_width(row.measured.std, 0.01)
    assert "seeds for a 95% half-width <= 1" in row.text(0.01) and "against" not in row.text(0.01)


def test_power_table_reads_only_the_planned_studys_tasks_and_never_pairs_two_protocols() -> None:
    from randmask_lab.errors import RunError

    runs = []
    for seed, (sst2, rte) in enumerate([(0.01, 0.08), (0.00, -0.06), (0.02, 0.05)]):  # rte: the noisy task
        for task, diff in (("sst2", sst2), ("rte", rte)):
            runs += [record(task, "randmask", 1e-2, seed, 0.8 + diff, 0.5, 1e-3),
                     record(task, "lora", 1e-3, seed, 0.8, 0.5)]
    cells = list(study_cells(runs).values())
    names = [row.name for row in power_table(cells)]
    assert names == ["rte: randmask 1e-03 − lora", "sst2: randmask 1e-03 − lora", "average: randmask 1e-03 − lora"]
    (row,) = power_table(cells, tasks={"sst2", "cb"})  # a study of sst2 and cb: rte's spread is not its average's
    assert row.name == "sst2: randmask 1e-03 − lora" and row.measured.std == pytest.approx(0.01)

    other_model = [RunRecord(r.run_id + "-big", {**r.config, "model": "big"}, r.status, r.metric,
                             val_loss=r.val_loss, test_metric=r.test_metric) for r in runs]
    rows = power_table(list(study_cells(runs + other_model).values()), tasks={"sst2"})
    assert [row.name for row in rows] == ["big sst2: randmask 1e-03 − lora", "tiny sst2: randmask 1e-03 − lora"]

    longer = [RunRecord(r.run_id + "-5ep", {**r.config, "epochs": 5}, r.status, r.metric, val_loss=r.val_loss,
                        test_metric=r.test_metric) for r in runs if r.config["task"] == "sst2"]
    with pytest.raises(RunError, match=r"tiny sst2 \S+ .*runs come in two protocols \(64/32/64 ex, 2 ep.*5 ep"):
        power_table(list(study_cells(runs + longer).values()))


def test_seeds_for_80_percent_power_clear_the_bound_in_80_percent_of_simulated_studies() -> None:
    """The one-sided count clears the bound only about half the time at the measured mean; the 80%-power count is
    where simulated studies (normal per-seed differences at that mean and sd) clear it 80% of the time."""
    rng = np.random.default_rng(0)
    mean, sd, bound = 0.0001, 0.0398, -0.01  # SST-2 randmask − LoRA as measured: 45 seeds half the time
    n = seeds_for_power(mean, sd, bound)
    assert seeds_for_lower_bound(mean, sd, bound) < n

    def cleared(seeds: int) -> float:
        draws = rng.normal(mean, sd, size=(20000, seeds))
        lower = draws.mean(1) - student_t.ppf(0.95, seeds - 1) * draws.std(1, ddof=1) / math.sqrt(seeds)
        return float((lower > bound).mean())

    assert 0.79 <= cleared(n) <= 0.83 and cleared(n - 8) < 0.79
    assert abs(cleared(seeds_for_lower_bound(mean, sd, bound)) - 0.5) < 0.03
    assert seeds_for_power(-0.02, sd, bound) is None and seeds_for_power(0.0, 0.0, bound) == 2


def _e_runs(ratios_of: dict[str, tuple[float, ...]]) -> list[RunRecord]:
    """randmask and structured at the ratios ``ratios_of`` gives each task, 4 seeds: the random − structured
    difference at 1e-4 and at 1e-5 move against each other per seed, so the pooled spread is below either's."""
    runs = []
    for seed, (d4, d5) in enumerate([(0.04, 0.00), (0.00, 0.05), (0.03, 0.01), (0.01, 0.03)]):
        for t, (task, ratios) in enumerate(sorted(ratios_of.items())):
            for ratio, diff in ((1e-4, d4), (1e-5, d5)):
                if ratio in ratios:
                    base = 0.7 + 0.01 * t + 0.002 * seed
                    runs += [record(task, "randmask", 3e-2, seed, base + diff, 0.5, ratio),
                             record(task, "structured", 3e-2, seed, base, 0.5, ratio)]
    return runs


def test_the_power_table_has_a_row_for_the_pooled_difference_rule_e_reads() -> None:
    """Rule (e) reads one difference, pooled per seed over every task × ratio both methods have (review27 repro 5):
    the power block sizes that statistic too, read the way finding_e reads it, beside the per-ratio rows."""
    from randmask_lab.study.findings import finding_e

    cells = list(study_cells(_e_runs({"sst2": (1e-4, 1e-5), "cb": (1e-4, 1e-5)})).values())
    rows = power_table(cells)
    pooled = rows[-1]
    assert pooled.name == "(e) as the rule reads it, randmask − structured pooled over cb, sst2 × 1e-04, 1e-05"
    assert [r.name for r in rows[:-1]] == [f"{t}: randmask {r} − structured {r}" for r in ("1e-04", "1e-05")
                                           for t in ("cb", "sst2", "average")]
    assert pooled.measured.n == 4 and pooled.bound == 0.0
    per_seed = [0.02, 0.025, 0.02, 0.02]  # per seed, the mean of its four cells' differences
    assert pooled.measured.mean == pytest.approx(statistics.fmean(per_seed))
    assert pooled.measured.std == pytest.approx(statistics.stdev(per_seed))
    assert all(r.measured.std > 0.01 > pooled.measured.std for r in rows[:-1])  # the per-ratio rows' spread is not it
    (rule,) = [e for e in finding_e(cells).evidence if e.startswith("pooled")]
    assert rule.startswith(f"pooled over 4 task×ratio cells: {pooled.measured.text()} points (4 seeds)")
    assert pooled.half_width == seeds_for_half_width(pooled.measured.std, 0.01)


def test_the_pooled_row_names_its_cells_and_comes_only_with_the_findings_comparisons() -> None:
    cells = list(study_cells(_e_runs({"sst2": (1e-4, 1e-5), "cb": (1e-4,)})).values())
    pooled = power_table(cells)[-1]
    assert pooled.name == "(e) as the rule reads it, randmask − structured pooled over cb 1e-04, sst2 1e-04, sst2 1e-05"
    assert pooled.measured.std > 0  # cb has only 1e-04's seeds, whose differences vary
    explicit = power_table(cells, comparisons=[("randmask 1e-04", "structured 1e-04", 0.0)])  # as reestimate asks
    assert [r.name for r in explicit] == [f"{t}: randmask 1e-04 − structured 1e-04" for t in ("cb", "sst2", "average")]
