"""Verdicts on the paper's findings from a study's records (and its analysis / theory outputs).

Each verdict is HOLDS, DOES NOT HOLD or INCONCLUSIVE, with the numbers behind it. The rules:
(a) randmask 1e-3 is non-inferior to LoRA and to full FT on the task average, by a margin of 1 point (the
    paper's claim is that it *matches* them, i.e. is not worse): HOLDS when the one-sided 95% lower bound
    of the paired difference (randmask - other) lies above -1 point for both; DOES NOT HOLD when the
    one-sided 95% upper bound lies below -1 point for either; INCONCLUSIVE otherwise. The two-sided 95%
    interval and the equivalence test (is the 90% interval inside [-1, +1]?) are printed beside it, and, where a
    paired seed is far off its cell (``stats.far_off_seeds``), a sensitivity line without it (never the rule); so
    is, where a seed's two runs were computed on different machines, a sensitivity line without such seeds.
(b) the best LR rises as the ratio falls: on every task the chosen LR is non-decreasing from 1e-3 to
    1e-5 and rises overall (HOLDS); a strict fall is DOES NOT HOLD. A chosen LR at its grid's edge says only that the
    best lies at or beyond it: a step (or the overall rise) that such an edge could undo is read as neither (a
    higher ratio's LR at its high edge, or a lower ratio's at its low edge), one it cannot undo as it stands.
(c) lambda_max after training falls as the ratio falls: for each pair of adjacent ratios, the two-sided 95% t
    interval of log10 λ(lower ratio) − log10 λ(higher ratio), paired by seed, lies below 0 (HOLDS for every
    pair); one above 0 is DOES NOT HOLD; INCONCLUSIVE otherwise (one seed gives no interval).
(d) the simulator's eigenvalues lie within Theorem 5.1's band for every p.
(e) structured is worse than random at <= 1e-4: the one-sided 95% lower bound of (random - structured),
    pooled per seed over tasks and ratios, lies above 0 (HOLDS); its one-sided 95% upper bound lies below
    0 (DOES NOT HOLD); INCONCLUSIVE otherwise. The two-sided 95% interval is printed beside it.
A difference whose seeds show no spread (each seed gives the same value, ``Estimate.spread_free``) has a t interval
of zero width, which measures no spread rather than showing there is none: (a), (c) and (e) read it as they read
one seed, INCONCLUSIVE.
A cell whose LR search is unfinished (known from the study's spec) is left out of every rule, and named.
(a) and (e) are INCONCLUSIVE, with the seeds named, while a seed of a compared cell finished without a test result
at the chosen LR (diverged, scale_collapsed) where the other side ran it: the plan counts it as run, and the paired
difference, which cannot read it, would leave it out in favour of the side whose run failed. A task and method in
two protocols (or models) is refused: a rule pairs one cell per task. So is a seed that two cells of a task ran on
other examples or in another order (``data_seed``/``order_seed``, ``cells.check_paired_draws``): pairing by seed
assumes one draw per seed.
A study is a fixed-seed design: while its spec's plan has runs left for the cells a rule reads (any run for (a)
and (e), an LR-search run for (b), which reads only the choices), the rule is INCONCLUSIVE, marked interim, with
its numbers so far. Deciding at a peek and again at every later one would inflate the rules' error rates.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from randmask import read_json_limited
from randmask_lab.errors import RunError
from randmask_lab.experiment.results.report import ratio_text
from randmask_lab.study.cells import StudyCell
from randmask_lab.study.evidence import (
    LEVEL,
    bounds_text,
    failed_lines,
    far_off_marks,
    machine_lines,
    seeds_text,
    sensitivity_lines,
)
from randmask_lab.study.plan import RunsLeft
from randmask_lab.study.power import E_POOLED, pooled_difference
from randmask_lab.study.stats import Estimate, average_by_seed, paired_difference

HOLDS, FAILS, UNSURE = "HOLDS", "DOES NOT HOLD", "INCONCLUSIVE"
RATIOS = (1e-3, 1e-4, 1e-5)
MARGIN = 0.01  # finding (a)'s non-inferiority margin: 1 point of the test metric


@dataclass
class Verdict:
    """One finding's verdict and the numbers behind it."""

    finding: str
    claim: str
    verdict: str
    evidence: list[str]
    interim: str = ""  # why the verdict waits (the plan's runs left), or "" when the rule was read on all its runs

    def text(self) -> str:
        interim = f", interim ({self.interim})" if self.interim else ""
        lines = [f"({self.finding}) {self.claim}: {self.verdict}{interim}"]
        return "\n".join(lines + [f"    {e}" for e in self.evidence])


def _label(method: str, ratio: float | None = None) -> str:
    return f"{method} {ratio_text(ratio)}" if ratio is not None else method  # as method_label names the cell


def _rows(cells: Sequence[StudyCell]) -> dict[str, dict[str, StudyCell]]:
    """method label -> task -> cell. A RunError when a task and method come in two protocols (or models): a rule
    pairs one cell per task, and keeping either silently would read a rule on the other protocol's runs."""
    rows: dict[str, dict[str, StudyCell]] = {}
    for c in cells:
        other = rows.setdefault(c.key[3], {}).setdefault(c.key[2], c)
        if other is not c:
            raise RunError(f"the {c.key[2]} {c.key[3]} runs come in two protocols ({other.key[0]}, "
                           f"{other.key[1]}; {c.key[0]}, {c.key[1]}), and a rule pairs one cell per task: give a "
                           "study file of one protocol per task")
    return rows


def greater_than(est: Estimate, bound: float, level: float = LEVEL) -> str:
    """The one-sided test of ``difference > bound``: HOLDS when the lower ``level`` bound lies above ``bound``,
    DOES NOT HOLD when the upper one lies below it, INCONCLUSIVE in between (or with fewer than 2 seeds)."""
    bounds = est.one_sided(level)
    if bounds is None:
        return UNSURE
    low, high = bounds
    return HOLDS if low > bound else FAILS if high < bound else UNSURE


def _equivalent(est: Estimate, margin: float) -> str:
    """Equivalence (TOST at 5%): both one-sided 95% bounds inside [-margin, +margin]."""
    bounds = est.one_sided(LEVEL)
    if bounds is None:
        return "n/a"
    return "yes" if -margin < bounds[0] and bounds[1] < margin else "no"


def finding_a(cells: Sequence[StudyCell]) -> Verdict:
    rows, evidence, verdicts = _rows(cells), [], []
    left = _label("randmask", 1e-3)
    for right in ("lora", "full"):
        if left not in rows or right not in rows:
            evidence.append(f"{left} or {right} has no cell with a chosen LR")
            verdicts.append(UNSURE)
            continue
        tasks = sorted(set(rows[left]) & set(rows[right]))
        evidence += _task_lines(rows, left, right, tasks) if len(tasks) > 1 else []
        lefts, rights = {t: rows[left][t].tests for t in tasks}, {t: rows[right][t].tests for t in tasks}
        diff = paired_difference(average_by_seed(lefts), average_by_seed(rights))
        failed = failed_lines({t: (rows[left][t], rows[right][t]) for t in tasks}, "  ")
        verdicts.append(UNSURE if failed else greater_than(diff, -MARGIN))
        evidence.append(f"{left} − {right} on the average of {', '.join(tasks)}: {diff.text()} points "
                        f"({seeds_text(diff.n)}), {bounds_text(diff)} -> non-inferior by {100 * MARGIN:g} point: "
                        f"{verdicts[-1]}; equivalent within ±{100 * MARGIN:g}: {_equivalent(diff, MARGIN)}")
        far_any = far_off_marks([(side, rows[side][t]) for t in tasks for side in (left, right)])  # every task's marks
        evidence += failed + sensitivity_lines(lefts, rights, far_any, "  ")
        evidence += machine_lines({t: (rows[left][t], rows[right][t]) for t in tasks}, lefts, rights, "  ")
    verdict = HOLDS if all(v == HOLDS for v in verdicts) else FAILS if FAILS in verdicts else UNSURE
    return Verdict("a", f"randmask 0.1% is not worse than LoRA or full FT by more than {100 * MARGIN:g} point "
                   "on the task average (non-inferiority, one-sided 95%)", verdict, evidence)


def _task_lines(rows: dict[str, dict[str, StudyCell]], left: str, right: str, tasks: Sequence[str]) -> list[str]:
    """(a)'s line per task (not the rule, which reads the task average), each with its sensitivity line."""
    lines = []
    for task in tasks:
        pair = rows[left][task], rows[right][task]
        per_task = paired_difference(pair[0].tests, pair[1].tests)
        read = UNSURE + " (a failed run, below)" if failed_lines({task: pair}, "") else greater_than(per_task, -MARGIN)
        lines.append(f"  {task}: {left} − {right} {per_task.text()} points ({seeds_text(per_task.n)}), "
                     f"{bounds_text(per_task)} -> {read}")
        far = far_off_marks([(left, pair[0]), (right, pair[1])])
        lines += sensitivity_lines({task: pair[0].tests}, {task: pair[1].tests}, far, "    ")
    return lines


def _best_lr_range(cell: StudyCell) -> tuple[float, float]:
    """Where the best LR of ``cell`` can lie: its chosen LR, or beyond it where that LR is the grid's edge (the search
    tried nothing past it)."""
    edge = cell.at_grid_edge
    return (-math.inf if edge == "low" else cell.lr), (math.inf if edge == "high" else cell.lr)


def _lr_order(first: StudyCell, then: StudyCell) -> str:
    """How ``then``'s best LR stands to ``first``'s: "falls" or "rises" when it surely does, "keeps" when it surely
    does not fall (a tie of the chosen LRs no edge can undo), "unsure" when an edge points toward the other (a fall
    of the chosen LRs is sure only when neither edge can undo it, and so is a rise or a tie; an edge pointing away
    changes nothing)."""
    (first_low, first_high), (then_low, then_high) = _best_lr_range(first), _best_lr_range(then)
    if then_high < first_low:
        return "falls"
    if then_low > first_high:
        return "rises"
    return "keeps" if then_low >= first_high else "unsure"


def finding_b(cells: Sequence[StudyCell]) -> Verdict:
    rows, evidence, falls, holding, unsure = _rows(cells), [], 0, 0, 0
    tasks = sorted({t for r in RATIOS for t in rows.get(_label("randmask", r), {})})
    for task in tasks:
        chain = [rows.get(_label("randmask", r), {}).get(task) for r in RATIOS]
        if any(c is None or c.lr is None for c in chain):
            evidence.append(f"{task}: not every ratio has a chosen LR")
            continue
        steps = [_lr_order(hi, lo) for hi, lo in zip(chain, chain[1:])]
        falls += steps.count("falls")
        unsure += "unsure" in steps
        holding += "falls" not in steps and "unsure" not in steps and _lr_order(chain[0], chain[-1]) == "rises"
        marks = ", ".join(f"{r:.0e}: {c.lr:.0e}{_edge_mark(c)}{_margin(c)}" for r, c in zip(RATIOS, chain))
        evidence.append(f"{task}: best LR by ratio {marks}")
    if tasks:
        evidence.append("(margin: the runner-up LR's mean validation loss minus the chosen one's, search seed; an "
                        "edge: the best LR may lie beyond it)")
    verdict = FAILS if falls else HOLDS if tasks and holding == len(tasks) else UNSURE
    return Verdict("b", "the best LR rises monotonically as the ratio falls", verdict, evidence)


def _edge_mark(cell: StudyCell) -> str:
    return {"low": " (low edge)", "high": " (high edge)"}.get(cell.at_grid_edge or "", "")


def _margin(cell: StudyCell) -> str:
    margin = cell.choice_margin  # a property that sorts the grid: read it once
    return "" if margin is None else f" (margin {margin:.3f})"


def finding_c(analysis_dirs: Sequence[str | Path]) -> Verdict:
    """Adjacent ratios compared by log10 λ after training, paired by seed (t interval over seeds)."""
    claim = "λ_max (after training) falls as the ratio falls"
    if not analysis_dirs:
        return Verdict("c", claim, UNSURE, ["no analysis outputs given (--analysis)"])
    from randmask_lab.analysis.figure4 import collect

    found = collect(analysis_dirs)
    rows = {r["ratio"]: r for r in found if r["method"] == "randmask"}
    name = "‖H‖₂" if any(r.get("quantity") == "norm" for r in found) else "λ_max"
    # Per state, the ratios (largest first) that have measurements, with their values by seed.
    series = {key: [(ratio, rows[ratio][f"{key}_by_seed"]) for ratio in sorted(rows, reverse=True)
                    if rows[ratio].get(f"{key}_by_seed")] for key in ("before", "after")}
    evidence = [f"{name} {when}: " + "; ".join(
        f"ratio {ratio_text(ratio)}: " + ", ".join(f"{v:.4g}" for _, v in sorted(vals.items()))
        for ratio, vals in series[key])
        for key, when in (("before", "at the pretrained weights"), ("after", "after training"))]
    after = [(ratio, {s: math.log10(v) for s, v in vals.items() if v > 0}) for ratio, vals in series["after"]]
    if len(after) < 2:
        return Verdict("c", claim, UNSURE, evidence + [f"fewer than two ratios with a trained {name}"])
    verdicts = []
    for (hi, log_hi), (lo, log_lo) in zip(after, after[1:]):
        if not set(log_hi) & set(log_lo):
            verdicts.append(UNSURE)
            continue
        diff = paired_difference(log_lo, log_hi)  # log10 λ(lower ratio) - log10 λ(higher ratio)
        evidence.append(f"log10 {name} at {lo:.0e} − at {hi:.0e}: {diff.text(scale=1.0, digits=2)} (seeds paired)")
        no_interval = diff.one_sided() is None  # one seed, or no spread
        verdicts.append(UNSURE if no_interval else HOLDS if diff.high < 0 else FAILS if diff.low > 0 else UNSURE)
    verdict = FAILS if FAILS in verdicts else HOLDS if all(v == HOLDS for v in verdicts) else UNSURE
    return Verdict("c", claim, verdict, evidence)


MAX_THEORY_BYTES = 1 << 20  # a summary is a few KB; a bigger file is not one


def finding_d(theory_summary: dict[str, Any] | None) -> Verdict:
    claim = "the simulator's eigenvalues lie within Theorem 5.1's band"
    if theory_summary is None:
        return Verdict("d", claim, UNSURE, ["no theory summary given (--theory theory_summary.json)"])
    per_p = theory_summary["per_p"]
    inside = {p: v["deviation_max"] <= v["thm51_bound"] for p, v in per_p.items()}
    evidence = [f"p={p}: max |λ_i(XMXᵀ) − p λ_i(XXᵀ)| = {v['deviation_max']:.4g} vs bound {v['thm51_bound']:.4g}"
                for p, v in per_p.items()]
    return Verdict("d", claim, HOLDS if all(inside.values()) else FAILS, evidence)


def read_theory_summary(path: str | Path) -> dict[str, Any]:
    """The ``theory_summary.json`` that `randmask theory` wrote, checked: a bounded read, and a ``per_p`` table of
    finite ``deviation_max`` / ``thm51_bound`` numbers (RunError naming the file otherwise, never a KeyError)."""
    fix = "give the theory_summary.json that `randmask theory` wrote"
    summary = read_json_limited(path, MAX_THEORY_BYTES, "theory summary", fix=fix, error=RunError)
    per_p = summary.get("per_p") if isinstance(summary, dict) else None
    if not isinstance(per_p, dict) or not per_p:
        raise RunError(f"theory summary {path} has no per_p table; {fix}")
    for p, row in per_p.items():
        if not isinstance(row, dict) or not all(
                isinstance(row.get(k), (int, float)) and not isinstance(row.get(k), bool) and math.isfinite(row[k])
                for k in ("deviation_max", "thm51_bound")):
            raise RunError(f"theory summary {path}: per_p[{p!r}] lacks finite deviation_max and thm51_bound; {fix}")
    return summary


def finding_e(cells: Sequence[StudyCell]) -> Verdict:
    pairs = E_POOLED.pairs(_rows(cells))  # "task ratio" -> (random, structured), as the power row reads them
    evidence = [f"{key}: random − structured {paired_difference(r.tests, s.tests).text()} points"
                for key, (r, s) in pairs.items()]
    claim = "structured masking is worse than random at ≤ 0.01%"
    if not pairs:
        return Verdict("e", claim, UNSURE, ["no structured runs"])
    diff = pooled_difference(pairs)
    pooled_r, pooled_s = ({key: pair[side].tests for key, pair in pairs.items()} for side in (0, 1))
    failed = failed_lines(pairs, "  ")
    verdict = UNSURE if failed else greater_than(diff, 0.0)
    evidence.append(f"pooled over {len(pairs)} task×ratio cells: {diff.text()} points ({seeds_text(diff.n)}), "
                    f"{bounds_text(diff)} -> random − structured > 0: {verdict}")
    evidence += failed + machine_lines(pairs, pooled_r, pooled_s, "  ")
    return Verdict("e", claim + " (random − structured > 0, one-sided 95%)", verdict, evidence)


# The cells each finding reads, by method label: a cell among them whose LR search is unfinished is left out, and
# the verdict says so.
READS = {"a": (_label("randmask", 1e-3), "lora", "full"), "b": tuple(_label("randmask", r) for r in RATIOS),
         "e": tuple(_label(m, r) for m in ("randmask", "structured") for r in (1e-4, 1e-5))}


def _left_out(verdict: Verdict, unfinished: Sequence[StudyCell]) -> Verdict:
    names = [f"{c.key[2]} {c.key[3]} ({len(c.lrs)} LR{'s' * (len(c.lrs) > 1)} tried)" for c in unfinished
             if c.key[3] in READS.get(verdict.finding, ())]
    if names:
        verdict.evidence.append("left out, their LR search unfinished (the study's plan has LRs to try): "
                                + ", ".join(names))
    return verdict


def _interim(verdict: Verdict, left: Mapping[tuple[str, str], RunsLeft]) -> Verdict:
    """``verdict`` made INCONCLUSIVE, and marked interim, while the plan has runs left for the cells it reads."""
    search_only = verdict.finding == "b"  # (b) reads the LR choices, which further seeds never change
    # '+': more runs follow later: a search still running plans its seeds (or an edge) once it ends, and a
    # pending re-estimation may add seeds (which (b)'s LR choices never depend on)
    reestimating = lambda n: n.reestimate_pending and not search_only  # noqa: E731
    waiting = {key: n for key, n in sorted(left.items()) if key[1] in READS.get(verdict.finding, ())
               and (n.search if search_only else n.total or reestimating(n))}
    if not waiting:
        return verdict
    plus = lambda n: bool(n.search) or reestimating(n)  # noqa: E731
    count = lambda n: f"{n.search if search_only else n.total}{'+' * plus(n)}"  # noqa: E731
    more = any(plus(n) for n in waiting.values())
    why = [reason for reason, applies in (("once its LR search ends", any(n.search for n in waiting.values())),
                                          ("if the seed count is re-estimated upwards",
                                           any(reestimating(n) for n in waiting.values()))) if applies]
    total = sum(n.search if search_only else n.total for n in waiting.values())
    verdict.verdict = UNSURE
    verdict.interim = f"{total}{'+' * more} planned run{'s' * (total > 1 or more)} left"
    verdict.evidence.append(
        f"interim, not a verdict: the study's plan has {'LR-search ' * search_only}runs left for "
        + ", ".join(f"{task} {label} ({count(n)})" for (task, label), n in waiting.items())
        + f" ('+': more {', or '.join(why)})" * more
        + "; the rule is read once they are in (a fixed-seed design: deciding at a peek inflates its error rate)")
    return verdict


def findings(cells: Sequence[StudyCell], analysis_dirs: Sequence[str | Path] = (),
             theory_file: str | Path | None = None,
             runs_left: Mapping[tuple[str, str], RunsLeft] | None = None) -> list[Verdict]:
    """All five verdicts. Cells marked ``search_unfinished`` are left out (their LR is not chosen yet).
    ``runs_left`` (``study.plan.plan_progress(spec, records).runs_left``): rules whose cells still have planned
    runs are INCONCLUSIVE, marked interim."""
    theory = read_theory_summary(theory_file) if theory_file else None
    chosen = [c for c in cells if not c.search_unfinished]
    unfinished = [c for c in cells if c.search_unfinished]
    verdicts = [finding_a(chosen), finding_b(chosen), finding_c(analysis_dirs), finding_d(theory), finding_e(chosen)]
    return [_interim(_left_out(v, unfinished), runs_left or {}) for v in verdicts]
