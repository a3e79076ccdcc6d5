"""The study forecast: runs after the LR search are counted, and each run is priced by its own task and method."""

from __future__ import annotations

import dataclasses

from test_plan import done, spec  # this folder is on sys.path (no __init__.py): the same module pytest loads

from randmask_lab.study.forecast import forecast, run_seconds
from randmask_lab.study.plan import CellSpec, needed_runs

KIND = "AVX512/bf16"  # the CPU kind the tests price on (forecast's kind=)


def _timed(record, seconds: float, kind: str = KIND, device: str = "cpu"):
    return dataclasses.replace(record, wall_seconds=seconds, machine={"cpu_kind": kind, "device": device})


def test_a_cell_in_its_search_counts_its_other_seeds_and_an_unfinished_method_is_not_priced() -> None:
    s = spec(cells=[CellSpec("randmask", (1e-2, 3e-2, 1e-1), 1e-4), CellSpec("full", (1e-5, 3e-5), None)])
    records = [_timed(done(1e-2, 0, 0.9), 600.0), _timed(done(3e-2, 0, 0.5), 1200.0)]
    planned = needed_runs(s, records)
    assert [(n.method, n.lr, n.seed) for n in planned] == [("randmask", 1e-1, 0), ("full", 1e-5, 0),
                                                           ("full", 3e-5, 0)]
    f = forecast(s, planned, records, kind=KIND)
    assert (f.planned, f.after_search) == (3, 4)  # seeds 1 and 2 of both cells
    assert f.hours == 3 * 900.0 / 3600  # randmask: 1 search run + 2 seeds at the median 900 s
    assert f.unpriced == {("sst2", "full"): 4}
    assert "at least 4 more" in f.text() and "sst2 full (4)" in f.text()


def test_seeds_at_the_chosen_lr_add_nothing_more_and_a_finished_study_is_zero() -> None:
    s = spec()
    records = [_timed(done(lr, 0, v), 60.0) for lr, v in ((1e-2, 0.9), (3e-2, 0.5), (1e-1, 0.7))]
    planned = needed_runs(s, records)
    assert [(n.lr, n.seed) for n in planned] == [(3e-2, 1), (3e-2, 2)]
    f = forecast(s, planned, records, kind=KIND)
    assert (f.planned, f.after_search, f.hours, f.unpriced) == (2, 0, 2 * 60.0 / 3600, {})
    records += [_timed(done(3e-2, k, 0.5), 60.0) for k in (1, 2)]
    assert forecast(s, needed_runs(s, records), records, kind=KIND).text().startswith("0 runs planned next")


def test_runs_of_another_model_do_not_set_the_price() -> None:
    s = spec()
    other = _timed(done(1e-2, 0, 0.9, model="another-model"), 6000.0)
    f = forecast(s, needed_runs(s, [other]), [other], kind=KIND)
    assert f.hours == 0.0 and f.unpriced == {("sst2", "randmask"): 3 + 2}


def test_only_runs_on_the_same_kind_of_cpu_set_the_price() -> None:
    s = spec()
    records = [_timed(done(1e-2, 0, 0.9), 60.0, kind="AVX2/no-bf16"), _timed(done(3e-2, 0, 0.5), 60.0, device="cuda"),
               dataclasses.replace(done(1e-1, 0, 0.7), wall_seconds=60.0)]  # made before records named their CPU
    f = forecast(s, needed_runs(s, records), records, kind=KIND)
    assert f.hours == 0.0 and f.unpriced == {("sst2", "randmask"): 2}
    assert f"on a {KIND} CPU" in f.text()


def test_a_cell_with_its_own_seeds_counts_them() -> None:
    s = spec(cells=[CellSpec("randmask", (1e-2, 3e-2), 1e-4, seeds=(0, 1, 2, 3, 4))])
    planned = needed_runs(s, [])
    assert forecast(s, planned, [], kind=KIND).after_search == 4


def test_a_paused_run_is_priced_by_its_cpu_time_per_thread() -> None:
    s = spec()
    paused = dataclasses.replace(_timed(done(1e-2, 0, 0.9, threads=1), 9000.0), cpu_seconds=1500.0)
    two = dataclasses.replace(_timed(done(3e-2, 0, 0.5, threads=2), 1000.0), cpu_seconds=1800.0)
    resumed_before_carried_cpu = dataclasses.replace(
        _timed(done(1e-1, 0, 0.7, threads=1), 700.0), cpu_seconds=100.0, carried_seconds=600.0,
        notes=["resumed from the checkpoint at step 5"])
    assert [run_seconds(r) for r in (paused, two, resumed_before_carried_cpu)] == [1500.0, 900.0, 1300.0]
    assert run_seconds(_timed(done(1e-2, 0, 0.9), 400.0)) == 400.0  # no CPU time recorded: the wall time
    f = forecast(s, needed_runs(s, [paused]), [paused], kind=KIND)
    assert f.hours == (2 + 2) * 1500.0 / 3600  # 2 more search runs, then seeds 1 and 2


def test_a_pair_run_only_on_another_kind_of_cpu_is_priced_at_the_measured_speed_ratio() -> None:
    s = spec(cells=[CellSpec("randmask", (1e-2, 3e-2, 1e-1), 1e-4), CellSpec("full", (1e-5, 3e-5), None)])
    here = [_timed(done(1e-5, 0, 0.9, method="full", ratio=None), 300.0)]  # full: 300 s here, 600 s on the other kind
    other = [_timed(done(1e-5, 0, 0.9, method="full", ratio=None), 600.0, kind="AVX2/no-bf16"),
             _timed(done(1e-2, 0, 0.9), 2000.0, kind="AVX2/no-bf16")]  # randmask ran on the other kind only
    records = here + other
    f = forecast(s, needed_runs(s, records), records, kind=KIND)
    assert f.scaled is not None and (f.scaled.other_kind, f.scaled.ratio, f.scaled.shared_pairs) == (
        "AVX2/no-bf16", 0.5, 1)
    # randmask: 2 more search runs + 2 seeds at 2000 s x 0.5; full: 1 search run + 2 seeds at 300 s.
    assert f.scaled.hours == 4 * 1000.0 / 3600 and f.hours == (4 * 1000.0 + 3 * 300.0) / 3600
    assert f.unpriced == {} and "estimated from AVX2/no-bf16 runs" in f.text() and "x0.50" in f.text()


def test_structured_is_priced_by_randmask_runs_until_it_has_its_own() -> None:
    s = spec(cells=[CellSpec("randmask", (1e-2, 3e-2, 1e-1), 1e-4), CellSpec("structured", (1e-2, 3e-2), 1e-4)])
    records = [_timed(done(lr, 0, v), 600.0) for lr, v in ((1e-2, 0.9), (3e-2, 0.5), (1e-1, 0.7))]
    f = forecast(s, needed_runs(s, records), records, kind=KIND)
    # randmask: seeds 1 and 2 at its LR; structured: 2 search runs + 2 seeds, all at randmask's 600 s
    assert f.unpriced == {} and f.hours == (2 + 4) * 600.0 / 3600 and f.priced_like == (4 * 600.0 / 3600,
                                                                                          ("structured",))
    assert "structured by randmask's" in f.text()
    own = records + [_timed(done(1e-2, 0, 0.9, method="structured"), 1200.0)]
    f = forecast(s, needed_runs(s, own), own, kind=KIND)
    assert f.priced_like == (0.0, ()) and "trains alike" not in f.text()  # its own run sets its price now


def test_runs_none_of_which_has_a_price_read_as_unknown_hours_not_zero() -> None:
    """With no run priced (review27 repro 8: stage 3's baselines, no finished run of their method) the hours sum to
    0.0, which the text (quoted into the docs) must not give as the total: it names them unpriced instead."""
    s = spec(cells=[CellSpec("full", (1e-5, 3e-5), None)])
    f = forecast(s, needed_runs(s, []), [], kind=KIND)
    assert f.hours == 0.0 and f.unpriced == {("sst2", "full"): 4}
    assert f.text() == ("2 runs planned next, at least 2 more once the LR searches end: 4 runs, none of them priced "
                        f"yet, so worker-hours unknown (no finished run of that task and method on a {KIND} CPU, nor "
                        "on one whose speed beside it is measured): sst2 full (4)")
    assert "worker-hours by" not in f.text()


def test_runs_partly_priced_keep_the_priced_hours_and_name_the_rest() -> None:
    s = spec(cells=[CellSpec("randmask", (1e-2, 3e-2, 1e-1), 1e-4), CellSpec("full", (1e-5, 3e-5), None)])
    records = [_timed(done(1e-2, 0, 0.9), 600.0), _timed(done(3e-2, 0, 0.5), 1200.0)]
    f = forecast(s, needed_runs(s, records), records, kind=KIND)
    assert f.text() == ("3 runs planned next, at least 4 more once the LR searches end: 7 runs, 0.8 worker-hours by "
                        f"the median time of finished runs (CPU time per thread) on this kind of CPU ({KIND}); not "
                        f"priced yet (no finished run of that task and method on a {KIND} CPU, nor on one whose speed "
                        "beside it is measured): sst2 full (4)")
