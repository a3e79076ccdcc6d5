"""How much of a study is left: runs planned now, runs that follow the LR search, and worker-hours.

``needed_runs`` plans only what can run now: a cell still in its LR search lists its search-seed runs,
and its other seeds follow once the search ends. The forecast adds those (a lower bound: a grid-edge
extension adds one more search run) and prices every run at the median wall time of finished runs of
the same task and method, the only honest price on this machine: RTE prompts are several times
SST-2's, and full fine-tuning costs about twice a masked run.
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass

from randmask_lab.experiment.record import RunRecord
from randmask_lab.study.plan import PlannedRun, StudySpec


@dataclass(frozen=True)
class Forecast:
    """Runs left (planned now + after the searches) and their price in worker-hours."""

    planned: int
    after_search: int  # other seeds of cells still searching (at least; extensions add more)
    hours: float  # for the (task, method) pairs that have a price
    unpriced: dict[tuple[str, str], int]  # (task, method) -> runs with no finished run to price them by

    def text(self) -> str:
        left = self.planned + self.after_search
        out = (f"{self.planned} runs planned next, at least {self.after_search} more once the LR searches end: "
               f"{left} runs")
        if left:
            out += f", {self.hours:.1f} worker-hours by the median wall time of finished runs"
        if self.unpriced:
            pairs = ", ".join(f"{t} {m} ({n})" for (t, m), n in sorted(self.unpriced.items()))
            out += f"; not priced yet (no finished run of that task and method): {pairs}"
        return out


def forecast(spec: StudySpec, planned: list[PlannedRun], records: list[RunRecord]) -> Forecast:
    """The forecast for ``planned`` (``needed_runs``' answer for ``records``)."""
    walls: dict[tuple[str, str], list[float]] = {}
    for r in records:  # this study's runs only: another model or precision in the store costs otherwise
        if r.status == "done" and r.wall_seconds and spec.holds(r):  # a resumed run's cost is all its attempts'
            walls.setdefault((r.config["task"], r.config["method"]), []).append(r.compute_seconds)
    # A cell whose planned runs are all search-seed runs and is not zero-shot is still searching.
    by_cell: dict[tuple[str, str, float | None], set[int]] = {}
    for run in planned:
        by_cell.setdefault((run.task, run.method, run.ratio), set()).add(run.seed)
    later: Counter[tuple[str, str]] = Counter()
    for (task, method, _), seeds in by_cell.items():
        if method != "zeroshot" and seeds == {spec.search_seed}:
            later[(task, method)] += len(spec.seeds) - 1
    counts = Counter((run.task, run.method) for run in planned) + later
    hours = sum(n * statistics.median(walls[key]) for key, n in counts.items() if key in walls) / 3600
    return Forecast(len(planned), sum(later.values()), hours,
                    {key: n for key, n in counts.items() if key not in walls})
