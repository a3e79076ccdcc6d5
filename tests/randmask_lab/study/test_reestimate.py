"""The seed re-estimation's decision: the most any comparison needs, capped, never below the planned count."""

from __future__ import annotations

from test_study import record  # this folder is on sys.path (no __init__.py)

from randmask_lab.study.cells import study_cells
from randmask_lab.study.power import seeds_for_half_width
from randmask_lab.study.reestimate import Reestimate, decide


def _cells(diffs: list[float]) -> list:
    runs = []
    for seed, diff in enumerate(diffs):
        runs += [record("sst2", "randmask", 1e-2, seed, 0.8 + diff, 0.5, 1e-3),
                 record("sst2", "lora", 1e-3, seed, 0.8, 0.5)]
    return list(study_cells(runs).values())


def test_the_count_is_what_the_spread_needs_capped_and_never_below_the_plan() -> None:
    rule = Reestimate((("randmask 1e-03", "lora"),), max_seeds=12)
    moderate = decide(rule, _cells([0.01, -0.01, 0.005, 0.0]), {"sst2"}, planned=4)
    (name, sd, need), = moderate.needs
    assert need == seeds_for_half_width(sd, 0.01) and moderate.seeds == min(max(need, 4), 12) and moderate.seeds > 4
    wild = decide(rule, _cells([0.5, -0.5, 0.4, -0.4]), {"sst2"}, planned=4)
    assert wild.seeds == 12 and "12 seeds instead of the 4 planned" in wild.text()  # out of any reach: the cap
    quiet = decide(rule, _cells([0.001, 0.0, 0.001, 0.0]), {"sst2"}, planned=4)
    assert quiet.seeds == 4 and "the 4 planned suffice" in quiet.text()
    nothing = decide(rule, _cells([0.01]), {"sst2"}, planned=4)  # one paired seed: no spread to read
    assert nothing.needs == () and nothing.seeds == 4 and "nothing to compare" in nothing.text()
