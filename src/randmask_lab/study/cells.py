"""The study's cells: for every (model, protocol, task, method/budget), the chosen LR and its seeds.

The LR is chosen as the paper does, by mean validation loss, over the seeds that every LR of the
cell has (the LR search seed, seed 0, when seeds 1 and 2 ran only at the chosen LR). Seeds added
at the chosen LR therefore never change the choice. A diverged run is infinitely bad on validation.

Records alone cannot tell a chosen LR from the best one so far of a search still running: the study's spec
can (``study.plan.plan_progress``), and a cell it names is marked ``search_unfinished``, so tables show
it as the best so far and findings leave it out.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from randmask_lab.errors import StoreError
from randmask_lab.experiment.results.record import FINISHED, RunRecord
from randmask_lab.experiment.results.report import method_label
from randmask_lab.experiment.results.settings import settings_of
from randmask_lab.experiment.results.store import protocol_label
from randmask_lab.experiment.run.untrained import UNTRAINED_METHODS

CellKey = tuple[str, str, str, str]  # model, protocol, task, method label


@dataclass
class StudyCell:
    """One cell: every run of it, the LR grid, the chosen LR and the test metric per seed there."""

    key: CellKey
    runs: list[RunRecord]
    lrs: list[float] = field(default_factory=list)
    lr: float | None = None  # None: every LR diverged (or zero-shot, which has no LR)
    tests: dict[int, float] = field(default_factory=dict)  # seed -> test metric at the chosen LR
    # LR -> mean over the search seeds (those every LR has): what the choice compares, and the Fig. 3 curves. Not
    # over all seeds: seeds 1 and 2 ran at the chosen LR only, and mixing them in compares unlike populations.
    search_val_loss: dict[float, float] = field(default_factory=dict)
    search_test: dict[float, float] = field(default_factory=dict)  # LRs whose search runs all have a test metric
    search_unfinished: bool = False  # the spec's plan still has LRs to try: ``lr`` is the best so far, not chosen
    machines: dict[int, str] = field(default_factory=dict)  # seed -> machine_label of its run at the chosen LR
    # seed -> status of its finished run at the chosen LR that has no test metric (diverged, scale_collapsed): a
    # planned seed the plan counts as run and ``tests`` lacks, so a paired difference leaves it out
    failed: dict[int, str] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return self.runs[0].config["method"]

    def keep_seeds(self, seeds: Collection[int]) -> list[int]:
        """Drop the chosen-LR results of seeds outside ``seeds`` (a plan's); returns the dropped seeds, sorted."""
        dropped = sorted((set(self.tests) | set(self.failed)) - set(seeds))
        for seed in dropped:
            for by_seed in (self.tests, self.failed, self.machines):
                by_seed.pop(seed, None)
        return dropped

    @property
    def ratio(self) -> float | None:
        return self.runs[0].config.get("ratio")

    @property
    def at_grid_edge(self) -> str | None:
        """"low" / "high" when the chosen LR is the smallest / largest tried (the grid may be too narrow)."""
        if self.lr is None or len(self.lrs) < 2:
            return None
        return "low" if self.lr == self.lrs[0] else "high" if self.lr == self.lrs[-1] else None

    @property
    def choice_margin(self) -> float | None:
        """How decisively the LR was chosen: the runner-up LR's mean search validation loss minus the
        chosen one's (None with fewer than two finite LRs). A margin of a few thousandths of a nat on a
        small validation set is within its noise."""
        finite = sorted(v for v in self.search_val_loss.values() if math.isfinite(v))
        return finite[1] - finite[0] if self.lr is not None and len(finite) >= 2 else None


def search_loss(r: RunRecord) -> float:
    """A run's validation loss for choosing the LR; inf when it diverged, failed or has none."""
    return r.val_loss if r.status == "done" and r.val_loss is not None and math.isfinite(r.val_loss) else math.inf


def machine_label(r: RunRecord) -> str:
    """The machine a run was computed on, as findings compare them: its GPU, else its CPU model and kind (fp32
    results differ in their last bits between CPU kernels); "" where the record names none (made before records
    named their machine)."""
    device = r.machine.get("device", "cpu")
    if device != "cpu":
        return str(device)
    model = r.machine.get("cpu_model")
    return f"{model} ({r.machine.get('cpu_kind', '?')})" if model else ""


def build_cell(key: CellKey, runs: Sequence[RunRecord]) -> StudyCell:
    """Choose the cell's LR and collect its per-seed test metrics."""
    cell = StudyCell(key, list(runs))
    by_lr: dict[float, list[RunRecord]] = defaultdict(list)
    for r in runs:
        by_lr[float(r.config.get("lr") or 0.0)].append(r)
    cell.lrs = sorted(by_lr)
    common = _search_seeds(key, by_lr)
    for lr, rs in by_lr.items():
        searched = [r for r in rs if r.config["seed"] in common]
        search = [search_loss(r) for r in searched]
        cell.search_val_loss[lr] = statistics.fmean(search) if search and all(map(math.isfinite, search)) else math.inf
        tests = [r.test_metric for r in searched if r.status == "done" and r.test_metric is not None]
        if tests and len(tests) == len(searched):
            cell.search_test[lr] = statistics.fmean(tests)
    best = min(cell.lrs, key=lambda lr: (cell.search_val_loss[lr], lr))
    if math.isfinite(cell.search_val_loss[best]):
        cell.lr = best if cell.method != "zeroshot" else None
        finished = [r for r in by_lr[best] if r.status == "done" and r.test_metric is not None]
        cell.tests = {r.config["seed"]: r.test_metric for r in finished}
        cell.machines = {r.config["seed"]: machine_label(r) for r in finished}
        cell.failed = {r.config["seed"]: r.status for r in by_lr[best] if r.config["seed"] not in cell.tests}
    return cell


def _search_seeds(key: CellKey, by_lr: dict[float, list[RunRecord]]) -> set[int]:
    """The seeds every LR of a cell has (its LR search seeds). A StoreError when there is none but the cell has
    two or more LRs: an LR run only at seeds the others lack (a stray run) would make every LR's mean search loss
    empty, and the cell would read as all-diverged with no seed left for any rule."""
    seeds = {lr: {r.config["seed"] for r in rs} for lr, rs in by_lr.items()}
    common = set.intersection(*seeds.values())
    if not common and len(seeds) > 1:
        usual = max({s for v in seeds.values() for s in v}, key=lambda s: (sum(s in v for v in seeds.values()), -s))
        stray = min(lr for lr, v in seeds.items() if usual not in v)  # an LR without the seed most LRs have
        raise StoreError(f"cell {' / '.join(key)}: its LRs share no seed (lr {stray:g} ran at seed"
                         f"{'s' * (len(seeds[stray]) > 1)} {', '.join(map(str, sorted(seeds[stray])))} only), so "
                         "no LR can be chosen on the seeds every LR has (the LR search seed). Remove the stray run "
                         "from the study file, or run the search seed at that LR.")
    return common


def check_one_setting(key: CellKey, runs: Sequence[RunRecord]) -> None:
    """StoreError when a cell's runs differ in a setting outside the cell key (a method option, the targets, ...),
    or two of its runs share an LR and a seed: a study averages a cell's runs as seeds of one setting, and either
    would be pooled or dropped silently. A study file of one spec never has them; a merge of two can."""
    settings = {settings_of(r.config) for r in runs}
    if len(settings) > 1:
        differing = sorted({name for variant in settings for name, value in variant
                            if len({dict(v)[name] for v in settings}) > 1})
        raise StoreError(f"cell {' / '.join(key)} holds runs that differ in {differing}: they are not seeds of one "
                         "cell. Keep the runs of one study spec in a study file (randmask merge joins one study's "
                         "parts).")
    seen: dict[tuple[float, int], str] = {}
    for r in runs:
        at = (float(r.config.get("lr") or 0.0), r.config["seed"])
        if at in seen:
            raise StoreError(f"cell {' / '.join(key)} holds two runs at lr {at[0]:g}, seed {at[1]}: {seen[at]} and "
                             f"{r.run_id} (another data or model copy). Keep one of them in the study file.")
        seen[at] = r.run_id


# The seeds a paired difference assumes one seed draws alike in every cell of a task: the examples (data_seed, which
# also picks the validation and test samples) and, for a method that trains, their order (order_seed). Not
# mask_seed: methods differ in their masks (LoRA has none), which is what a paired difference compares.
_PAIRED_DRAWS = (("data_seed", "examples"), ("order_seed", "training order"))


def check_paired_draws(grouped: dict[CellKey, list[RunRecord]]) -> None:
    """StoreError when two cells of one task ran a seed on other examples or in another order: the rules pair seed s
    of one cell with seed s of the other, which is a paired comparison only where both drew the same examples in the
    same order (a zero-shot run trains nothing, so has no order). A study spec never sets ``data_seed`` or
    ``order_seed`` (the plan does); a hand-made record can."""
    seen: dict[tuple[str, str, str, str, int], tuple[int, str]] = {}
    for (model, protocol, task, _), runs in grouped.items():
        for r, (name, what) in ((r, d) for r in runs for d in _PAIRED_DRAWS):
            if name == "order_seed" and r.config["method"] in UNTRAINED_METHODS:
                continue
            seed = r.config["seed"]
            drawn = seed if r.config.get(name) is None else r.config[name]
            first = seen.setdefault((model, protocol, task, name, seed), (drawn, r.run_id))
            if first[0] != drawn:
                raise StoreError(f"task {task}: seed {seed} drew its {what} with {name} {first[0]} in run {first[1]} "
                                 f"but {drawn} in run {r.run_id}, and the rules pair runs of one seed as one draw. "
                                 f"Keep runs of one seed on the same {name} in the study file (a study's plan leaves "
                                 "it unset).")


def cell_key(config: dict[str, Any]) -> CellKey:
    """The cell a run belongs to: its model, protocol, task and method/budget."""
    return config["model"], protocol_label(config), config["task"], method_label(config)


def study_cells(records: Sequence[RunRecord], unfinished: Collection[CellKey] = ()) -> dict[CellKey, StudyCell]:
    """Every cell of the finished runs (done, diverged or scale_collapsed) in ``records``; the cells in
    ``unfinished`` (those whose LR search the study's plan has not finished) are marked ``search_unfinished``."""
    grouped: dict[CellKey, list[RunRecord]] = defaultdict(list)
    for r in records:
        if r.status in FINISHED:  # as the plan counts them: a scale_collapsed run is run, not missing
            grouped[cell_key(r.config)].append(r)
    for key, runs in grouped.items():
        check_one_setting(key, runs)
    check_paired_draws(grouped)
    cells = {key: build_cell(key, runs) for key, runs in grouped.items()}
    for key in set(unfinished) & set(cells):
        cells[key].search_unfinished = True
    return cells
