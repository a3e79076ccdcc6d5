"""How much of a study is left: runs planned now, runs that follow the LR search, and worker-hours.

``needed_runs`` plans only what can run now: a cell still in its LR search lists its search-seed runs,
and its other seeds follow once the search ends. The forecast adds those (a lower bound: a grid-edge
extension adds one more search run) and prices every run at the median time of finished runs of the
same task and method, the only honest price on this machine: RTE prompts are several times SST-2's,
and full fine-tuning costs about twice a masked run. A run's time is its CPU time over its threads
(``run_seconds``): wall time also counts the pauses of a worker (kill -STOP while the machine does other
work), which doubled the first confirmatory runs' wall times. Only runs made on the same kind of CPU
count at face value (``randmask_lab.machine.cpu_kind``: torch's CPU capability and native bf16): an AVX2
machine and an AMX one differ several-fold, and a record made before records named their CPU has no kind.
A (task, method) pair with no run on this kind but runs on another is priced by those runs times the two
kinds' measured speed ratio (the median, over the pairs both kinds ran, of this kind's median time over the
other's), and the text says how much of the total is such an estimate; with no shared pair it stays unpriced.
A method that trains through another's code with only its mask's pattern changed (``structured``: randmask's op and
steps, its entries in blocks) is priced, while it has no run of its own, by that method's runs on the same task,
and the text says so too.
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass

from randmask_lab.experiment.results.record import RunRecord
from randmask_lab.machine import cpu_kind
from randmask_lab.study.plan import PlannedRun, StudySpec, is_search_run


@dataclass(frozen=True)
class SpeedScaling:
    """Hours priced from another CPU kind's runs, scaled by the two kinds' measured speed ratio."""

    hours: float  # included in Forecast.hours
    other_kind: str
    ratio: float  # this kind's run time over the other kind's, median over the shared pairs
    shared_pairs: int  # (task, method) pairs both kinds finished runs of
    priced: frozenset[tuple[str, str]] = frozenset()  # the (task, method) pairs it priced

    def text(self) -> str:
        return (f"{self.hours:.1f} of them estimated from {self.other_kind} runs at this CPU's measured speed "
                f"(x{self.ratio:.2f} their time, the median over the {self.shared_pairs} task-method "
                f"pair{'s' if self.shared_pairs != 1 else ''} both ran)")


# method -> the method whose runs price it while it has none: the same training code and step count, only the mask's
# pattern differs (randmask_lab.methods: MASK_KIND_OF)
PRICED_LIKE: dict[str, str] = {"structured": "randmask"}


@dataclass(frozen=True)
class Forecast:
    """Runs left (planned now + after the searches) and their price in worker-hours."""

    planned: int
    after_search: int  # other seeds of cells still searching (at least; extensions add more)
    hours: float  # for the (task, method) pairs that have a price
    unpriced: dict[tuple[str, str], int]  # (task, method) -> runs with no finished run to price them by
    kind: str = ""  # the CPU kind whose runs set the prices
    scaled: SpeedScaling | None = None  # the part priced from another kind's runs, if any
    priced_like: tuple[float, tuple[str, ...]] = (0.0, ())  # hours priced by PRICED_LIKE, and the methods so priced

    def text(self) -> str:
        left = self.planned + self.after_search
        out = (f"{self.planned} runs planned next, at least {self.after_search} more once the LR searches end: "
               f"{left} runs")
        if left and sum(self.unpriced.values()) >= left:
            # No run has a price: ``hours`` sums the priced runs only, so its 0.0 would read as a total (and the docs
            # quote this line) where the total is unknown.
            return out + f", none of them priced yet, so worker-hours unknown {self._unpriced_text()}"
        if left:
            out += self._priced_text()
        if self.unpriced:
            out += f"; not priced yet {self._unpriced_text()}"
        return out

    def _priced_text(self) -> str:
        """The hours of the priced runs, and how much of them came from another CPU kind or a method trained alike."""
        out = (f", {self.hours:.1f} worker-hours by the median time of finished runs (CPU time per thread) on this "
               f"kind of CPU ({self.kind})")
        if self.scaled:
            out += f", {self.scaled.text()}"
        hours, methods = self.priced_like
        if methods:
            likes = ", ".join(f"{m} by {PRICED_LIKE[m]}'s" for m in methods)
            out += (f", {hours:.1f} of them priced, with no run of their own yet, by the same task's runs of the "
                    f"method that trains alike ({likes}: the same op and steps, only the mask's pattern differs)")
        return out

    def _unpriced_text(self) -> str:
        pairs = ", ".join(f"{t} {m} ({n})" for (t, m), n in sorted(self.unpriced.items()))
        return (f"(no finished run of that task and method on a {self.kind} CPU, nor on one whose speed beside it is "
                f"measured): {pairs}")


def run_seconds(r: RunRecord) -> float:
    """What ``r`` cost a worker that had its cores: CPU time over the threads it ran, over all its attempts, not
    inflated by pauses; its wall time where the record lacks either (or its earlier attempts' CPU time)."""
    cpu, threads = r.compute_cpu_seconds, r.config.get("threads")
    carried_known = r.resumed_at is None or r.carried_cpu_seconds is not None
    if cpu and carried_known and isinstance(threads, int) and not isinstance(threads, bool) and threads >= 1:
        return cpu / threads
    return r.compute_seconds


def forecast(spec: StudySpec, planned: list[PlannedRun], records: list[RunRecord], kind: str | None = None
             ) -> Forecast:
    """The forecast for ``planned`` (``needed_runs``' answer for ``records``), priced by finished runs made on
    a CPU of ``kind`` (default: this machine's) on the CPU (not a GPU)."""
    kind = kind or cpu_kind()
    walls_by_kind: dict[str, dict[tuple[str, str], list[float]]] = {}
    for r in records:  # this study's runs only: another model or precision in the store costs otherwise
        run_kind, on_cpu = r.machine.get("cpu_kind"), r.machine.get("device", "cpu") == "cpu"
        seconds = run_seconds(r) if r.status == "done" and r.wall_seconds else 0.0
        if seconds > 0 and spec.holds(r) and on_cpu and isinstance(run_kind, str):  # > 0: a ratio divides by it
            pair = (r.config["task"], r.config["method"])
            walls_by_kind.setdefault(run_kind, {}).setdefault(pair, []).append(seconds)
    medians = {k: {key: statistics.median(v) for key, v in pairs.items()} for k, pairs in walls_by_kind.items()}
    here = medians.pop(kind, {})
    # A cell the plan gives search runs is still searching: its other seeds come after.
    searching = {(run.task, run.method, run.ratio) for run in planned if is_search_run(spec, run)}
    later: Counter[tuple[str, str]] = Counter()
    for task, method, ratio in searching:
        cell = next((c for c in spec.cells if c.method == method and c.ratio == ratio), None)
        later[(task, method)] += len(spec.cell_seeds(cell) if cell else spec.seeds) - 1
    counts = Counter((run.task, run.method) for run in planned) + later
    hours = sum(n * here[key] for key, n in counts.items() if key in here) / 3600
    unpriced = {key: n for key, n in counts.items() if key not in here}
    scaled = _scaled_from_another_kind(here, medians, unpriced)
    if scaled:
        unpriced = {key: n for key, n in unpriced.items() if key not in scaled.priced}
        hours += scaled.hours
    alike = {(task, method): here[(task, PRICED_LIKE[method])] for task, method in unpriced
             if (task, PRICED_LIKE.get(method)) in here}
    alike_hours = sum(unpriced[key] * seconds for key, seconds in alike.items()) / 3600
    unpriced = {key: n for key, n in unpriced.items() if key not in alike}
    methods = tuple(sorted({method for _, method in alike}))
    return Forecast(len(planned), sum(later.values()), hours + alike_hours, unpriced, kind, scaled,
                    (alike_hours, methods))


def _scaled_from_another_kind(here: dict[tuple[str, str], float], others: dict[str, dict[tuple[str, str], float]],
                              unpriced: dict[tuple[str, str], int]) -> SpeedScaling | None:
    """``unpriced`` priced by the other CPU kind that shares the most pairs with this one (then prices the most
    runs), scaled by the median of this kind's time over that kind's on the shared pairs."""
    candidates = [(sum(key in times for key in here), sum(n for key, n in unpriced.items() if key in times), other)
                  for other, times in others.items()]
    usable = [c for c in candidates if c[0] and c[1]]
    if not usable:
        return None
    shared, _, other = max(usable)
    times = others[other]
    ratio = statistics.median(here[key] / times[key] for key in here if key in times)
    priced = frozenset(key for key in unpriced if key in times)
    hours = sum(unpriced[key] * times[key] * ratio for key in priced) / 3600
    return SpeedScaling(hours, other, ratio, shared, priced)
