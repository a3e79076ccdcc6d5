"""The evidence lines a verdict prints beside its rule: seed counts and one-sided bounds in words, the seeds far off
their cell, the seeds whose two runs ran on different machines, and the sensitivity lines without them. A
sensitivity line is never the rule; it shows the reader how much of the interval those runs carry."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence

from randmask_lab.study.cells import StudyCell
from randmask_lab.study.stats import Estimate, average_by_seed, far_off_seeds, paired_difference

LEVEL = 0.95  # each one-sided bound's confidence


def seeds_text(n: int) -> str:
    return f"{n} seed" if n == 1 else f"{n} seeds"


def bounds_text(est: Estimate, level: float = LEVEL) -> str:
    bounds = est.one_sided(level)
    if est.spread_free:
        return f"no one-sided bounds: every seed gives {100 * est.mean:.1f}, a spread of 0, which no verdict reads"
    if bounds is None:
        return "one-sided bounds need 2+ seeds"
    return f"one-sided {level:.0%} bounds {100 * bounds[0]:.1f} / {100 * bounds[1]:.1f}"


def far_off_marks(cells: Sequence[tuple[str, StudyCell]]) -> dict[int, str]:
    """Seed -> what marks it, for the seeds far off their cell (``stats.far_off_seeds``) in any of the (label, cell)
    pairs ``cells``, in their order."""
    marks: dict[int, list[str]] = {}
    for label, cell in cells:
        for f in far_off_seeds(cell.tests):
            marks.setdefault(f.seed, []).append(f"{label} {cell.key[2]} seed {f.seed} at {100 * f.value:.1f}")
    return {seed: ", ".join(m) for seed, m in sorted(marks.items())}


def sensitivity_lines(left: Mapping[str, Mapping[int, float]], right: Mapping[str, Mapping[int, float]],
                 far: Mapping[int, str], indent: str, without: str = "") -> list[str]:
    """The paired difference (left - right, averaged over the tasks per seed) again without the seeds ``far``:
    a sensitivity line, printed only where such a seed is paired. It is never the rule, which reads every planned
    seed; it shows the reader how much of the interval those runs carry. ``without`` names the seeds left out
    (default: the far-off seeds, each with its mark)."""
    drop = lambda values: {s: v for s, v in values.items() if s not in far}  # noqa: E731
    paired = set(average_by_seed(left)) & set(average_by_seed(right))
    if not paired & set(far):
        return []
    diff = paired_difference(average_by_seed({t: drop(v) for t, v in left.items()}),
                             average_by_seed({t: drop(v) for t, v in right.items()}))
    without = without or f"the far-off seeds ({'; '.join(far.values())})"
    return [f"{indent}sensitivity, not the rule: without {without}: {diff.text()} points ({seeds_text(diff.n)}), "
            f"{bounds_text(diff)}"]


def machine_lines(pairs: Mapping[str, tuple[StudyCell, StudyCell]], left: Mapping[str, Mapping[int, float]],
              right: Mapping[str, Mapping[int, float]], indent: str) -> list[str]:
    """Where each paired seed's two runs were computed (``cells.machine_label``), per task of ``pairs`` (task ->
    (left cell, right cell)): how many seeds ran both on one machine and, where some did not, the difference
    without them (a sensitivity line, never the rule). Machines change a run's last bits, not its expectation, but
    a reader cannot know that of a comparison whose sides ran apart unless it is shown."""
    counts, across, unknown = [], defaultdict(list), set()
    for task, (a, b) in sorted(pairs.items()):
        seeds = sorted(set(a.tests) & set(b.tests))
        same = 0
        for seed in seeds:
            where = a.machines.get(seed, ""), b.machines.get(seed, "")
            if not all(where):
                unknown.add(seed)
            elif where[0] == where[1]:
                same += 1
            else:
                across[(task, *where)].append(seed)
        counts.append(f"{task} {same} of {seeds_text(len(seeds))}")
    if not across and len(unknown) == len({s for a, b in pairs.values() for s in set(a.tests) & set(b.tests)}):
        return []  # no record names its machine: nothing to say
    lines = [f"{indent}machines: a seed's two runs ran on one machine in {', '.join(counts)}"
             + (f"; {seeds_text(len(unknown))} name none" if unknown else "")]
    marks = {seed: "" for seeds in across.values() for seed in seeds}
    groups = "; ".join(f"{task} seed{'s' * (len(seeds) > 1)} {', '.join(map(str, seeds))} on {m1} / {m2}"
                       for (task, m1, m2), seeds in sorted(across.items()))
    without = f"the seeds whose two runs ran on different machines ({groups})"
    return lines + sensitivity_lines(left, right, marks, indent, without)


def failed_lines(pairs: Mapping[str, tuple[StudyCell, StudyCell]], indent: str) -> list[str]:
    """The seeds of ``pairs`` (task -> (left cell, right cell)) whose run at the chosen LR finished without a test
    metric (``StudyCell.failed``: diverged, scale_collapsed) while the other side ran that seed: a line naming
    them, or none. The plan counts such a run as run, and a paired difference leaves its seed out, which favours
    the side whose run failed; the rule reads every planned seed and has no value for it, so it is not read."""
    found: dict[tuple[str, str, str], list[int]] = defaultdict(list)  # (label, task, status) -> seeds
    for a, b in pairs.values():
        for cell, other in ((a, b), (b, a)):
            for seed, status in sorted(cell.failed.items()):
                if seed in set(other.tests) | set(other.failed):
                    found[(cell.key[3], cell.key[2], status)].append(seed)
    lines = _no_lr_lines(pairs, indent)
    if not found:
        return lines
    named = "; ".join(f"{label} {task} seed{'s' * (len(seeds) > 1)} {', '.join(map(str, seeds))} ({status})"
                      for (label, task, status), seeds in sorted(found.items()))
    return lines + [f"{indent}not read: {named}: finished without a test result at the chosen LR, so the difference "
                    "above leaves them out (favouring the side whose run failed); the rule reads every planned seed, "
                    "so it stays INCONCLUSIVE until such a run is repeated or a person decides how a failed run counts"]


def _no_lr_lines(pairs: Mapping[str, tuple[StudyCell, StudyCell]], indent: str) -> list[str]:
    """A line naming each cell of ``pairs`` that failed at every LR it tried (no LR chosen, so no seed to pair: an
    average over cells keeps only the seeds every cell has, and would silently keep none), or none."""
    dead = sorted({c.key[2:]: c for pair in pairs.values() for c in pair
                   if c.lr is None and c.method != "zeroshot" and c.lrs and not c.search_unfinished}.items())
    return [f"{indent}not read: {task} {label} finished no run at any LR it tried ("
            + ", ".join(f"{lr:g}" for lr in cell.lrs) + "; "
            + ", ".join(sorted({r.status for r in cell.runs})) + "), so it has no seed to pair; the rule stays "
            "INCONCLUSIVE until its LR grid is extended or a person decides how a cell that never trained counts"
            for (task, label), cell in dead]


__all__ = ["LEVEL", "bounds_text", "failed_lines", "far_off_marks", "machine_lines", "seeds_text",
           "sensitivity_lines"]
