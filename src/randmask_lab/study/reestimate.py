"""Sample-size re-estimation for a study: how many seeds the cells a rule compares run, decided once from the
spread of their planned seeds (an internal pilot).

A spec's ``reestimate`` names pairs of cells (``compare``). When every named cell has run its planned seeds on
every task (``study.plan`` gathers those records), :func:`decide` reads each comparison's per-seed sd of the paired
difference on the task average (on one task, that task's), over the planned seeds only, and gives the named cells
the seeds a two-sided 95% interval needs for a half-width of at most ``half_width`` (``power.seeds_for_half_width``),
at most ``max_seeds``. It reads no mean difference, so it cannot aim at a verdict (its effect on a t-test's error
rate is the small one of an internal pilot: Wittes & Brittain, 1990); and it reads only the planned seeds, so it
is made once: further seeds never move it.

Why the paired-by-seed average and not per-task seed counts: seed k draws the same mask on every task (the mask
seed defaults to the seed), so the tasks' differences at one seed may covary, and the paired average carries that.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from randmask_lab.study.cells import StudyCell
from randmask_lab.study.power import power_table


@dataclass(frozen=True)
class Reestimate:
    """A spec's ``reestimate`` rule: the cells it compares, the half-width it asks for, the most seeds it gives."""

    compare: tuple[tuple[str, str], ...]  # pairs of method labels as the tables name them ("randmask 1e-03")
    max_seeds: int
    half_width: float = 0.01

    @property
    def labels(self) -> set[str]:
        """The labels of every cell it names."""
        return {label for pair in self.compare for label in pair}


@dataclass(frozen=True)
class SeedsDecided:
    """What the spec's ``reestimate`` rule decided, once its cells' planned seeds were in."""

    needs: tuple[tuple[str, float, int | None], ...]  # per comparison: its name, per-seed sd, seeds it needs
    planned: int  # the seeds the named cells planned
    seeds: int  # the seeds they run: the planned count, or more (at most the rule's max_seeds)

    def text(self) -> str:
        needs = "; ".join(f"{name}: per-seed sd {100 * sd:.2f} points -> {'out of reach' if n is None else n}"
                          for name, sd, n in self.needs)
        verdict = (f"the {self.planned} planned suffice" if self.seeds == self.planned
                   else f"{self.seeds} seeds instead of the {self.planned} planned")
        return f"seeds re-estimated from the planned seeds' spread (no mean read): {needs or 'nothing to compare'}: " \
               f"{verdict}"


def decide(rule: Reestimate, pilot: Sequence[StudyCell], tasks: Collection[str], planned: int) -> SeedsDecided:
    """The seed count ``rule`` gives its cells, from the ``pilot`` cells (the named cells' records at their planned
    seeds only) on the study's ``tasks``; ``planned``: the seeds the named cells planned."""
    needs = []
    for left, right in rule.compare:
        rows = power_table(pilot, rule.half_width, [(left, right, -rule.half_width)], tasks=tasks)
        row = next((r for r in rows if r.name.startswith("average: ")), rows[0] if len(rows) == 1 else None)
        if row is not None:  # none: fewer than 2 paired seeds (a diverged cell): nothing to read
            needs.append((row.name, row.measured.std or 0.0, row.half_width))
    most = max((rule.max_seeds if n is None else n for _, _, n in needs), default=planned)
    return SeedsDecided(tuple(needs), planned, max(planned, min(most, rule.max_seeds)))


__all__ = ["Reestimate", "SeedsDecided", "decide"]
