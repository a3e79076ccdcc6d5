"""How many seeds a comparison needs, from the per-seed standard deviations a study has measured.

A seed is one whole training run, so the spread of a paired difference over seeds is what an interval
over seeds is made of. For a comparison whose per-seed differences have standard deviation ``sd``:

- **precision**: the fewest seeds n whose two-sided 95% t interval has half-width ``t_{0.975, n-1} sd / sqrt(n)``
  at most the margin (1 point): what "the interval is narrow enough to decide" asks for;
- **the one-sided test** a finding decides (``difference > bound``: ``-margin`` for (a)'s non-inferiority, 0 for
  (e)): the fewest n at which the one-sided 95% lower bound ``mean - t_{0.95, n-1} sd / sqrt(n)`` clears the
  bound, if the true difference were the mean measured so far; and, when that mean lies below the bound, the
  fewest n at which the one-sided upper bound ``mean + t_{0.95, n-1} sd / sqrt(n)`` falls below it: the test
  decided the other way (DOES NOT HOLD). A mean on the bound decides neither way at any seed count.
  At that n the bound clears only about half the time (the measured mean is as likely to come out below the true
  one as above), so each one-sided count is printed with the n for 80% power beside it: the fewest seeds at which
  the bound clears in 80% of studies if the true difference and sd are the ones measured (noncentral t).

Both read an sd measured on few seeds, which is itself uncertain (with 3 seeds its 95% interval spans about
0.5x to 6x): the answer is a planning figure, to be re-read as the study's own seeds come in.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from scipy.stats import nct
from scipy.stats import t as student_t

from randmask_lab.errors import RunError
from randmask_lab.experiment.results.report import ratio_text
from randmask_lab.study.cells import StudyCell
from randmask_lab.study.stats import Estimate, average_by_seed, paired_difference

MAX_SEEDS = 1000  # beyond this, "not within reach" is the honest answer


def seeds_for_half_width(sd: float, margin: float, level: float = 0.95) -> int | None:
    """The fewest seeds (>= 2) whose two-sided ``level`` t interval has half-width <= ``margin``."""
    if sd == 0:
        return 2
    for n in range(2, MAX_SEEDS + 1):
        if student_t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n) <= margin:
            return n
    return None


def seeds_for_lower_bound(mean: float, sd: float, bound: float, level: float = 0.95) -> int | None:
    """The fewest seeds (>= 2) whose one-sided ``level`` lower bound lies above ``bound`` at this mean and sd
    (None when the mean itself is at or below ``bound``, or beyond MAX_SEEDS)."""
    if mean <= bound:
        return None
    for n in range(2, MAX_SEEDS + 1):
        if mean - student_t.ppf(level, n - 1) * sd / math.sqrt(n) > bound:
            return n
    return None


def seeds_for_power(mean: float, sd: float, bound: float, power: float = 0.8, level: float = 0.95) -> int | None:
    """The fewest seeds (>= 2) at which the one-sided ``level`` lower bound clears ``bound`` with probability
    ``power``, if the per-seed differences are normal with this mean and sd: the t statistic against ``bound``
    is then noncentral t with n-1 degrees of freedom and noncentrality (mean - bound) sqrt(n) / sd. None when
    the mean is at or below ``bound``, or beyond MAX_SEEDS."""
    if mean <= bound:
        return None
    if sd == 0:
        return 2
    for n in range(2, MAX_SEEDS + 1):
        if nct.sf(student_t.ppf(level, n - 1), n - 1, (mean - bound) * math.sqrt(n) / sd) >= power:
            return n
    return None


def seeds_for_upper_bound(mean: float, sd: float, bound: float, level: float = 0.95) -> int | None:
    """The fewest seeds (>= 2) whose one-sided ``level`` upper bound lies below ``bound`` at this mean and sd: the
    mirror of ``seeds_for_lower_bound`` (None when the mean is at or above ``bound``, or beyond MAX_SEEDS)."""
    return seeds_for_lower_bound(-mean, sd, -bound, level)


@dataclass(frozen=True)
class PowerRow:
    """One comparison: what was measured and how many seeds it needs."""

    name: str
    measured: Estimate
    bound: float  # the one-sided test is difference > bound
    half_width: int | None
    one_sided: int | None  # seeds for the lower bound to clear ``bound`` (the test HOLDS)
    one_sided_against: int | None = None  # seeds for the upper bound to fall below ``bound`` (DOES NOT HOLD)
    powered: int | None = None  # seeds for the lower bound to clear ``bound`` in 80% of studies
    powered_against: int | None = None  # seeds for the upper bound to fall below it in 80% of studies

    def text(self, margin: float) -> str:
        m = self.measured
        need = lambda n: "out of reach" if n is None else str(n)
        bound = f"{100 * self.bound:+g}"
        powered = lambda n, p: f"{need(n)}, {need(p)} for 80% power" if n is not None else need(n)
        against = (f" (its upper bound < {bound}, which decides against it: "
                   f"{powered(self.one_sided_against, self.powered_against)})" if m.mean < self.bound else "")
        return (f"{self.name}: mean {100 * m.mean:+.2f}, per-seed sd {100 * (m.std or 0):.2f} points over "
                f"{m.n} seeds -> seeds for a 95% half-width <= {100 * margin:g}: {need(self.half_width)}; "
                f"for a one-sided 95% lower bound > {bound} at this mean: "
                f"{powered(self.one_sided, self.powered)}{against}")


@dataclass(frozen=True)
class Pooled:
    """One difference pooled per seed over tasks and ratios, as rule (e) reads it (``findings.finding_e``): every
    task × ratio cell pair both methods have, each side's tests averaged per seed over its cells, then paired by seed.

    A kind of comparison of its own because its per-seed sd is not any per-ratio row's (it averages several cells'
    noise, which may cancel), so seeds sized on those rows are not the seeds the rule needs."""

    finding: str  # the rule it is, for the row's name: "e"
    left: str  # method, e.g. "randmask"
    right: str
    ratios: tuple[float, ...]
    bound: float  # the one-sided test is difference > bound

    def pairs(self, rows: Mapping[str, Mapping[str, StudyCell]]) -> dict[str, tuple[StudyCell, StudyCell]]:
        """``"task ratio"`` (``sst2 1e-04``) -> (left cell, right cell), for each ratio and each task both methods
        have at it, from ``rows`` (method label -> task -> cell, the labels the tables use)."""
        out = {}
        for ratio in self.ratios:
            left = rows.get(f"{self.left} {ratio_text(ratio)}", {})
            right = rows.get(f"{self.right} {ratio_text(ratio)}", {})
            for task in sorted(set(left) & set(right)):
                out[f"{task} {ratio_text(ratio)}"] = left[task], right[task]
        return out

    def name(self, pairs: Mapping[str, tuple[StudyCell, StudyCell]]) -> str:
        """What the row reads, e.g. ``(e) as the rule reads it, randmask − structured pooled over cb, sst2 × 1e-04,
        1e-05`` (the cells one by one where some task lacks a ratio)."""
        tasks = sorted({a.key[2] for a, _ in pairs.values()})
        ratios = [ratio_text(r) for r in self.ratios if any(k.endswith(f" {ratio_text(r)}") for k in pairs)]
        over = (f"{', '.join(tasks)} × {', '.join(ratios)}" if len(pairs) == len(tasks) * len(ratios)
                else ", ".join(pairs))
        return f"({self.finding}) as the rule reads it, {self.left} − {self.right} pooled over {over}"


def pooled_difference(pairs: Mapping[str, tuple[StudyCell, StudyCell]]) -> Estimate:
    """left − right over the cell pairs of ``Pooled.pairs``, the way rule (e) pools them: each side's tests averaged
    per seed over all its cells (``stats.average_by_seed``: only seeds every cell has), then paired by seed
    (``stats.paired_difference``). Shared so that the power row and the rule cannot read two statistics."""
    return paired_difference(average_by_seed({key: a.tests for key, (a, _) in pairs.items()}),
                             average_by_seed({key: b.tests for key, (_, b) in pairs.items()}))


# Rule (e)'s one statistic: random against structured (> 0), pooled over every task at both ratios <= 1e-4.
E_POOLED = Pooled("e", "randmask", "structured", (1e-4, 1e-5), 0.0)

# The comparisons the findings decide, with the bound each one-sided test clears: (a) randmask 1e-3 against LoRA
# and full FT (non-inferiority, -1 point), (e) random against structured (> 0). (e)'s rows per ratio are kept beside
# the pooled one the rule reads: they show which ratio carries the spread.
COMPARISONS: tuple[tuple[str, str, float] | Pooled, ...] = (
    ("randmask 1e-03", "lora", -0.01), ("randmask 1e-03", "full", -0.01),
    ("randmask 1e-04", "structured 1e-04", 0.0), ("randmask 1e-05", "structured 1e-05", 0.0), E_POOLED)


def power_table(cells: Sequence[StudyCell], margin: float = 0.01,
                comparisons: Sequence[tuple[str, str, float] | Pooled] = COMPARISONS,
                tasks: Collection[str] | None = None) -> list[PowerRow]:
    """A row per model, comparison and task (and on the task average) with at least 2 paired seeds; a ``Pooled``
    comparison gives one row per model, named by its rule ("(e) as the rule reads it, ...").

    ``tasks``: only these tasks, so the average is the one the planned study decides on (an average over other
    tasks has another spread). Rows are named by model when ``cells`` hold more than one. A RunError when one
    model's task and method come in more than one protocol: their seeds would be paired across protocols."""
    by_model = _by_model(cells, tasks)
    out: list[PowerRow] = []
    for model, rows in sorted(by_model.items()):
        prefix = f"{model} " if len(by_model) > 1 else ""
        for comparison in comparisons:
            if isinstance(comparison, Pooled):
                out += _pooled_rows(rows, comparison, margin, prefix)
                continue
            left, right, bound = comparison
            out += [_row(f"{prefix}{task}: {left} − {right}", paired_difference(a, b), bound, margin)
                    for task, a, b in _sides(rows, left, right) if len(set(a) & set(b)) >= 2]
    return out


def _by_model(cells: Sequence[StudyCell], tasks: Collection[str] | None
              ) -> dict[str, dict[str, dict[str, StudyCell]]]:
    """model -> method label -> task -> cell, only ``tasks``' cells; a RunError on a task and method in two
    protocols."""
    by_model: dict[str, dict[str, dict[str, StudyCell]]] = {}
    for c in cells:
        model, protocol, task, method = c.key
        if tasks is not None and task not in tasks:
            continue
        other = by_model.setdefault(model, {}).setdefault(method, {}).setdefault(task, c)
        if other.key[1] != protocol:
            raise RunError(f"power: the {model} {task} {method} runs come in two protocols ({other.key[1]}; "
                           f"{protocol}): give a study file of one protocol per task")
    return by_model


def _sides(rows: Mapping[str, Mapping[str, StudyCell]], left: str, right: str
           ) -> list[tuple[str, dict[int, float], dict[int, float]]]:
    """(task, left tests, right tests) per task both labels have, and on their average when there are several."""
    shared = sorted(set(rows.get(left, {})) & set(rows.get(right, {})))
    sides = [(task, rows[left][task].tests, rows[right][task].tests) for task in shared]
    if len(shared) > 1:
        sides.append(("average", average_by_seed({t: rows[left][t].tests for t in shared}),
                      average_by_seed({t: rows[right][t].tests for t in shared})))
    return sides


def _pooled_rows(rows: Mapping[str, Mapping[str, StudyCell]], pooled: Pooled, margin: float,
                 prefix: str) -> list[PowerRow]:
    """The one row of ``pooled`` (none with fewer than 2 paired seeds, or no cell pair)."""
    pairs = pooled.pairs(rows)
    if not pairs:
        return []
    est = pooled_difference(pairs)
    if est.n < 2:
        return []
    return [_row(f"{prefix}{pooled.name(pairs)}", est, pooled.bound, margin)]


def _row(name: str, est: Estimate, bound: float, margin: float) -> PowerRow:
    """``est``'s row: the seeds each test needs at its measured mean and per-seed sd."""
    sd = est.std or 0.0
    return PowerRow(name, est, bound, seeds_for_half_width(sd, margin), seeds_for_lower_bound(est.mean, sd, bound),
                    seeds_for_upper_bound(est.mean, sd, bound), seeds_for_power(est.mean, sd, bound),
                    seeds_for_power(-est.mean, sd, -bound))
