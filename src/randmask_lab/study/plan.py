"""A study's protocol as a plan: which runs are still needed, given what the store holds.

The paper's protocol, made resumable: seed ``search_seed`` over each cell's LR grid; an optimum at
the grid's edge gets the next point of the 1-3-10 ladder (up to ``max_extend`` times per side);
then the other seeds at the chosen LR. Each call of ``needed_runs`` looks only at finished records,
so a killed study, or a second worker on the same store, picks up where the store stands.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from randmask_lab.errors import RunError
from randmask_lab.experiment.compute.precision import AUTO, PRECISIONS
from randmask_lab.experiment.results.record import FINISHED, RunRecord
from randmask_lab.experiment.results.report import method_label
from randmask_lab.experiment.run.untrained import TRAINING_ONLY, UNTRAINED_METHODS
from randmask_lab.study.cells import CellKey, cell_key, search_loss, study_cells
from randmask_lab.study.reestimate import Reestimate, SeedsDecided, decide
from randmask_lab.study.spec_checks import check_spec_file

LADDER = [float(f"{m}e{e}") for e in range(-7, 1) for m in (1, 3)]  # exact decimal LRs: 1e-7, 3e-7, ... 3e0


@dataclass(frozen=True)
class CellSpec:
    """One row of the study: a method (and masking ratio), its starting LR grid, its tasks."""

    method: str
    lrs: tuple[float, ...] = ()
    ratio: float | None = None
    tasks: tuple[str, ...] | None = None  # None: every task of the study
    seeds: tuple[int, ...] | None = None  # None: the study's seeds (a cell may need more or fewer)
    stage: int = 0  # runs are planned stage by stage: what matters most goes first


@dataclass
class StudySpec:
    """A study: model, precision, per-task protocol, the cells, seeds. Read from JSON."""

    name: str
    model: str
    precision: str
    protocol: dict[str, dict[str, Any]]  # task -> RunConfig fields (n_train, n_val, n_test, epochs, ...)
    cells: list[CellSpec]
    seeds: tuple[int, ...] = (0, 1, 2)
    search_seed: int = 0
    max_extend: int = 2
    common: dict[str, Any] = field(default_factory=dict)  # RunConfig fields for every run (batch_size, ...)
    reestimate: Reestimate | None = None  # None: every cell runs its planned seeds, no more

    def holds(self, record: RunRecord) -> bool:
        """Whether ``record`` is a run of this study's model and precision (a store may hold other studies)."""
        return record.config.get("model") == self.model and record.config.get("precision", "32") == self.precision

    @classmethod
    def from_file(cls, path: str | Path) -> StudySpec:
        """Parse a study spec; a one-line error naming the file and field when it is wrong."""
        data = check_spec_file(path)  # bounded read, strict JSON, every field's type and range (spec_checks.py)
        try:
            cells = [CellSpec(c["method"], tuple(map(float, c.get("lrs", ()))), c.get("ratio"),
                              tuple(c["tasks"]) if c.get("tasks") else None,
                              tuple(c["seeds"]) if c.get("seeds") is not None else None, int(c.get("stage", 0)))
                     for c in data["cells"]]
            rule = data.get("reestimate")
            reestimate = None if rule is None else Reestimate(
                tuple((left, right) for left, right in rule["compare"]), rule["max_seeds"],
                float(rule.get("half_width", 0.01)))
            spec = cls(data["name"], data["model"], data["precision"], data["protocol"], cells,
                       tuple(data.get("seeds", (0, 1, 2))), data.get("search_seed", 0), data.get("max_extend", 2),
                       data.get("common", {}), reestimate)
        except (KeyError, TypeError, ValueError) as e:
            raise RunError(f"study spec {path}: {type(e).__name__}: {e}. "
                           "See experiments/*.json for the format.") from None
        for cell in spec.cells:
            if cell.method != "zeroshot" and not cell.lrs:
                raise RunError(f"study spec {path}: cell {cell.method} {cell.ratio} has no lrs.")
            unknown = set(cell.tasks or ()) - set(spec.protocol)
            if unknown:
                raise RunError(f"study spec {path}: cell {cell.method} names tasks {sorted(unknown)} with no protocol.")
        for seeds in (spec.seeds, *(c.seeds for c in spec.cells if c.seeds is not None)):
            if spec.search_seed not in seeds:
                raise RunError(f"study spec {path}: search_seed {spec.search_seed} is not one of seeds {seeds}.")
        if spec.reestimate is not None:
            labels = {spec.label(task, cell) for task, cell in _task_cells(spec)}
            unknown = sorted(spec.reestimate.labels - labels)
            if unknown:
                raise RunError(f"study spec {path}: reestimate.compare names {unknown}, which are not cells of the "
                               f"study (its cells: {', '.join(sorted(labels))})")
            same = [left for left, right in spec.reestimate.compare if left == right]
            if same:
                raise RunError(f"study spec {path}: reestimate.compare compares {same[0]} with itself; name two cells")
        if spec.precision == AUTO:
            raise RunError(f"study spec {path}: precision 'auto' resolves to bf16-mixed on machines with native "
                           "bf16 and to 32 elsewhere, and a study keeps one precision: name one (32 runs at full "
                           "speed on every CPU; bf16-mixed only where bf16 is native).")
        if spec.precision not in PRECISIONS:
            raise RunError(f"study spec {path}: precision {spec.precision!r} is not one of {', '.join(PRECISIONS)}.")
        return spec

    def only_stages(self, stages: Sequence[int] | None) -> StudySpec:
        """This spec with only the cells of ``stages`` (None: all): machines can split a study by stage."""
        if not stages:
            return self
        have = {c.stage for c in self.cells}
        missing = sorted(set(stages) - have)
        if missing:
            raise RunError(f"study {self.name} has no stage {', '.join(map(str, missing))}; its stages are "
                           f"{', '.join(map(str, sorted(have)))}")
        return dataclasses.replace(self, cells=[c for c in self.cells if c.stage in set(stages)])

    def cell_seeds(self, cell: CellSpec) -> tuple[int, ...]:
        """The seeds a cell plans at its chosen LR (its own, else the study's); ``reestimate`` may add more."""
        return self.seeds if cell.seeds is None else cell.seeds

    def reestimated_cells(self) -> list[tuple[str, CellSpec]]:
        """Every (task, cell) whose label ``reestimate`` names, in plan order (none without the rule)."""
        named = self.reestimate.labels if self.reestimate else set()
        return [(task, cell) for task, cell in _task_cells(self) if self.label(task, cell) in named]

    def label(self, task: str, cell: CellSpec) -> str:
        """The cell's method label on ``task``, as the tables and ``reestimate.compare`` name it."""
        return method_label({**self.common, **self.protocol[task], "method": cell.method, "ratio": cell.ratio})


@dataclass(frozen=True)
class PlannedRun:
    """One run the study still needs."""

    task: str
    method: str
    ratio: float | None
    lr: float
    seed: int


RunId = Callable[[PlannedRun], str]


def neighbour(lr: float, step: int) -> float | None:
    """The next LR up (step=+1) or down (-1) on the 1-3-10 ladder; None past its ends."""
    i = min(range(len(LADDER)), key=lambda k: abs(math.log(LADDER[k] / lr)))
    j = i + step
    return LADDER[j] if 0 <= j < len(LADDER) else None


def _fixed(spec: StudySpec, task: str, cell: CellSpec) -> dict[str, Any]:
    """The fields every run of ``cell`` on ``task`` takes from the spec, as ``run.run_config`` sets them: a zero-shot
    cell leaves out the common fields that only shape training."""
    return {k: v for k, v in {**spec.common, **spec.protocol[task]}.items()
            if cell.method not in UNTRAINED_METHODS or k not in TRAINING_ONLY}


def _matches(r: RunRecord, task: str, cell: CellSpec, fixed: dict[str, Any]) -> bool:
    c = r.config
    return (c["task"] == task and c["method"] == cell.method and c.get("ratio") == cell.ratio
            and all(c.get(k) == v for k, v in fixed.items()))


def _is_current(r: RunRecord, task: str, cell: CellSpec, run_id: RunId | None) -> bool:
    """Whether ``r`` is the very run the spec asks for under this code (data, sampler version); any run when
    ``run_id`` is None."""
    return run_id is None or r.run_id == run_id(
        PlannedRun(task, cell.method, cell.ratio, float(r.config["lr"]), r.config["seed"]))


def _cell_runs(spec: StudySpec, task: str, cell: CellSpec, finished: list[RunRecord],
               run_id: RunId | None, seeds: tuple[int, ...] | None = None) -> list[PlannedRun]:
    """The runs one cell still needs on one task (at ``seeds``: the cell's planned seeds unless given)."""
    seeds = spec.cell_seeds(cell) if seeds is None else seeds
    fixed = _fixed(spec, task, cell)
    done = {(float(r.config["lr"]), r.config["seed"]): r for r in finished if _matches(r, task, cell, fixed)}
    done = {key: r for key, r in done.items() if _is_current(r, task, cell, run_id)}
    if cell.method == "zeroshot":  # no LR: one evaluation per seed (data sample)
        lr = cell.lrs[0] if cell.lrs else 1e-3
        return [PlannedRun(task, cell.method, None, lr, s) for s in seeds if not any(key[1] == s for key in done)]
    grid = sorted({*cell.lrs, *(lr for lr, s in done if s == spec.search_seed)})
    missing = [PlannedRun(task, cell.method, cell.ratio, lr, spec.search_seed) for lr in grid
               if (lr, spec.search_seed) not in done]
    if missing:
        return missing
    best = min(grid, key=lambda lr: (search_loss(done[(lr, spec.search_seed)]), lr))
    if math.isfinite(search_loss(done[(best, spec.search_seed)])):
        for edge, step in ((grid[-1], +1), (grid[0], -1)):
            extended = sum(lr > max(cell.lrs) for lr in grid) if step > 0 else sum(lr < min(cell.lrs) for lr in grid)
            nxt = neighbour(best, step)
            if best == edge and extended < spec.max_extend and nxt is not None:
                return [PlannedRun(task, cell.method, cell.ratio, nxt, spec.search_seed)]
    else:
        return []  # every LR diverged: the cell is reported as diverged
    return [PlannedRun(task, cell.method, cell.ratio, best, s) for s in seeds if (best, s) not in done]


def is_search_run(spec: StudySpec, run: PlannedRun) -> bool:
    """Whether ``run`` belongs to its cell's LR search: the search seed of a cell that has an LR (zero-shot has
    none). A cell the plan still gives such a run is still searching; its other seeds follow the choice."""
    return run.method != "zeroshot" and run.seed == spec.search_seed


def _task_cells(spec: StudySpec) -> list[tuple[str, CellSpec]]:
    """Every (task, cell) of the study in plan order: stage by stage, task by task, cells in spec order."""
    return [(task, cell) for stage in sorted({cell.stage for cell in spec.cells}) for task in spec.protocol
            for cell in spec.cells if cell.stage == stage and (cell.tasks is None or task in cell.tasks)]


def _finished(spec: StudySpec, records: list[RunRecord]) -> list[RunRecord]:
    return [r for r in records if r.status in FINISHED and spec.holds(r)]


def seeds_decided(spec: StudySpec, records: list[RunRecord]) -> SeedsDecided | None:
    """The spec's ``reestimate`` decision on ``records``; None without the rule, when the spec (cut by
    ``only_stages``) lacks a cell it names, or until every cell it names has run its planned seeds on every task."""
    return _seeds_decided(spec, _finished(spec, records))


def _seeds_decided(spec: StudySpec, finished: list[RunRecord], run_id: RunId | None = None) -> SeedsDecided | None:
    rule = spec.reestimate
    if rule is None:
        return None
    involved = spec.reestimated_cells()
    if {spec.label(task, cell) for task, cell in involved} != rule.labels:
        return None  # --stages left out a cell it names: deciding on part of the comparisons would decide otherwise
    if any(_cell_runs(spec, task, cell, finished, run_id) for task, cell in involved):
        return None
    pilot = [r for task, cell in involved for r in finished  # only the planned seeds: the decision is made once
             if _matches(r, task, cell, _fixed(spec, task, cell))
             and r.config["seed"] in spec.cell_seeds(cell) and _is_current(r, task, cell, run_id)]
    planned = max(len(spec.cell_seeds(cell)) for _, cell in involved)
    return decide(rule, list(study_cells(pilot).values()), set(spec.protocol), planned)


def _seeds_for(spec: StudySpec, task: str, cell: CellSpec, decided: SeedsDecided | None) -> tuple[int, ...]:
    """The seeds a cell runs: its planned ones, and the further seeds ``decided`` gives the cells it names."""
    planned = spec.cell_seeds(cell)
    if decided is None or decided.seeds <= len(planned) or spec.reestimate is None or \
            spec.label(task, cell) not in spec.reestimate.labels:
        return planned
    start = max(planned) + 1
    return planned + tuple(range(start, start + decided.seeds - len(planned)))


def needed_runs(spec: StudySpec, records: list[RunRecord], run_id: RunId | None = None) -> list[PlannedRun]:
    """Every run the study needs next, stage by stage (cells' ``stage``, 0 first). Within a stage, every LR-search
    run (and zero-shot evaluation) comes first, task by task (protocol order), cells in spec order; then the further
    seeds seed by seed, each seed's tasks in protocol order and cells in spec order. So a study stopped part-way has
    its LRs chosen (and its compute priced), then whole pairs of seeds for the paired comparisons, on every task:
    the findings compare cells seed by seed, per task and on the task average, which pairs a seed only where every
    task has it. Not many seeds of a few cells, or of one task, that nothing pairs with. Stages put what matters
    most first.

    ``run_id`` (planned run -> the run id it would get) makes a record count only when its id is the
    one the run would get now: a record of other data, or of a mask sampler since changed
    (``randmask.MASK_KIND_VERSIONS``), is stale, and its run is planned again."""
    finished = _finished(spec, records)
    decided = _seeds_decided(spec, finished, run_id)
    stages: dict[int, list[PlannedRun]] = {}  # stage -> its runs, task by task, cells in spec order
    for task, cell in _task_cells(spec):
        seeds = _seeds_for(spec, task, cell, decided)
        stages.setdefault(cell.stage, []).extend(_cell_runs(spec, task, cell, finished, run_id, seeds))
    return [run for runs in stages.values() for run in sorted(runs, key=lambda run: _order_in_stage(spec, run))]


def _order_in_stage(spec: StudySpec, run: PlannedRun) -> tuple[bool, int]:
    """Sort key within one stage: LR searches and zero-shot first, then further seeds seed by seed. Seed-major
    because the verdicts compare cells seed by seed (paired differences), on each task and on the task average.
    Python's stable sort keeps the rest of the order: task by task, cells in spec order, within each key."""
    further = run.method != "zeroshot" and not is_search_run(spec, run)
    return further, run.seed if further else 0


@dataclass(frozen=True)
class RunsLeft:
    """How many runs the plan still has for one (task, method/budget) cell: of its LR search, and in all; and
    whether the spec's ``reestimate`` rule, not yet decided, may give it further seeds."""

    search: int
    total: int
    reestimate_pending: bool = False


@dataclass(frozen=True)
class PlanProgress:
    """Where a study's plan stands on a set of records: what its tables and verdicts must not yet present as
    final.

    ``unfinished_searches``: the cells (``study.cells`` keys) of the records whose LR search the plan has not
    finished (it still plans a run of the search seed for them), so their best LR so far is not yet the chosen
    one. ``runs_left``: (task, method label as ``report.method_label`` names it) -> the runs the plan still has
    for that cell, for every cell with runs left or a pending re-estimation (others are absent), records or not.
    What makes a verdict interim: the study is a fixed-seed design, and a rule read before its planned seeds are
    in is a peek."""

    unfinished_searches: frozenset[CellKey]
    runs_left: dict[tuple[str, str], RunsLeft]
    # (task, method label) -> the seeds the plan runs at the cell's chosen LR (those re-estimation decided
    # included): the seeds a rule reads, so that runs beyond them (added by hand) never turn an interim into a final
    planned_seeds: dict[tuple[str, str], frozenset[int]] = field(default_factory=dict)


def plan_progress(spec: StudySpec, records: list[RunRecord]) -> PlanProgress:
    """One walk over the plan's cells (the runs ``needed_runs`` would give, uncounted by run id) -> its progress."""
    finished = _finished(spec, records)
    unfinished: set[CellKey] = set()
    left: dict[tuple[str, str], RunsLeft] = {}
    decided = _seeds_decided(spec, finished)
    pending = {(task, id(cell)) for task, cell in spec.reestimated_cells()} if decided is None else set()
    planned: dict[tuple[str, str], frozenset[int]] = {}
    for task, cell in _task_cells(spec):
        seeds = _seeds_for(spec, task, cell, decided)
        key = (task, spec.label(task, cell))
        planned[key] = planned.get(key, frozenset()) | frozenset(seeds)
        runs = _cell_runs(spec, task, cell, finished, None, seeds)
        if not runs and (task, id(cell)) not in pending:  # a cell done with its planned seeds may still get more
            continue
        fixed = _fixed(spec, task, cell)
        searching = sum(is_search_run(spec, run) for run in runs)
        if searching:  # keyed as the records' cells are (study.cells), protocol fields included
            unfinished |= {cell_key(r.config) for r in finished if _matches(r, task, cell, fixed)}
        before = left.get(key, RunsLeft(0, 0))
        left[key] = RunsLeft(before.search + searching, before.total + len(runs),
                             before.reestimate_pending or (task, id(cell)) in pending)
    return PlanProgress(frozenset(unfinished), left, planned)
