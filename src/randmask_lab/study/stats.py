"""Intervals over seeds, and differences paired by seed.

Why a t interval over seeds: a seed is one whole training run (its own data sample, mask and
order), and the spread the paper's claims depend on is the spread between such runs. The records
keep each run's test metric, not per-example predictions, so a bootstrap over seeds x examples is
not available; with 3 seeds the t interval is wide, and says so.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from scipy.stats import t as student_t

# A std at or below this is float noise around one value: seeds' metrics are fractions in [0, 1] (or log10 λ), and
# k/n - j/n computed twice differs by ~1e-16.
NO_SPREAD = 1e-9


@dataclass(frozen=True)
class Estimate:
    """Mean over n seeds, its sample std, and a two-sided t interval (None when n < 2; n = 0: nothing paired)."""

    mean: float
    std: float | None
    low: float | None
    high: float | None
    n: int

    @property
    def spread_free(self) -> bool:
        """Whether 2+ seeds all gave one value (to float noise): their t interval is a point, which measures no
        spread rather than showing there is none (two runs per seed collapsed alike give it; so can 2 seeds)."""
        return self.std is not None and self.std <= NO_SPREAD

    def one_sided(self, level: float = 0.95) -> tuple[float, float] | None:
        """(lower, upper) one-sided ``level`` bounds: mean -/+ t_{level, n-1} std / sqrt(n) (None when n < 2, or
        when the seeds show no spread: a verdict on a zero-width interval would claim certainty no seed count gives).

        Each is the bound of its own one-sided test: ``low > -margin`` shows non-inferiority at ``level``."""
        if self.std is None or self.spread_free:
            return None
        half = student_t.ppf(level, self.n - 1) * self.std / math.sqrt(self.n)
        return self.mean - half, self.mean + half

    def text(self, scale: float = 100.0, digits: int = 1) -> str:
        """e.g. ``86.1 ± 0.8 [84.2, 88.0]`` (metric x100 by default)."""
        f = lambda v: f"{scale * v:.{digits}f}"
        if self.n == 0:
            return "no shared seed"
        if self.std is None:
            return f"{f(self.mean)} (n=1)"
        return f"{f(self.mean)} ± {f(self.std)} [{f(self.low)}, {f(self.high)}]"


def mean_interval(values: Sequence[float], level: float = 0.95) -> Estimate:
    """Mean and the ``level`` t interval of ``values`` (one per seed)."""
    if not values:
        raise ValueError("no values to summarise")
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return Estimate(mean, None, None, None, n)
    std = statistics.stdev(values)
    half = student_t.ppf(0.5 + level / 2, n - 1) * std / math.sqrt(n)
    return Estimate(mean, std, mean - half, mean + half, n)


def paired_difference(a: Mapping[int, float], b: Mapping[int, float], level: float = 0.95) -> Estimate:
    """``a - b`` over the seeds both have (dicts seed -> value), with a t interval of the differences."""
    seeds = sorted(set(a) & set(b))
    if not seeds:  # e.g. the two sides ran on other seeds: nothing to pair, so no interval (and no verdict)
        return Estimate(math.nan, None, None, None, 0)
    return mean_interval([a[s] - b[s] for s in seeds], level)


@dataclass(frozen=True)
class FarOff:
    """A seed whose value lies ``z`` robust standard deviations from its cell's median."""

    seed: int
    value: float
    median: float
    robust_std: float  # 1.4826 x the median absolute deviation: the std of a normal sample, unmoved by the outlier

    @property
    def z(self) -> float:
        return (self.value - self.median) / self.robust_std


# Robust z beyond which a seed is listed. The MAD of a few seeds is itself noisy: in 200,000 simulated cells of
# normal seeds, one passed 5 in 3.6% of the cells of 10 seeds, 8 in 0.5% (30 seeds: 0.7%, 0.01%).
FAR_OFF_Z = 8.0
FAR_OFF_MIN_SEEDS = 10  # with fewer, the median and MAD measure too little (5 seeds: 4.8% of cells pass 8)


def far_off_seeds(values: Mapping[int, float], threshold: float = FAR_OFF_Z) -> list[FarOff]:
    """Seeds of one cell (seed -> value) more than ``threshold`` robust stds from the cell's median.

    Descriptive only: a listed seed is a real run and stays in every mean and interval (the study counts every
    planned seed); the list tells a reader when one run carries a cell's spread. The median absolute deviation,
    not the std, because one collapsed run inflates the std it would be measured by. None with fewer than
    ``FAR_OFF_MIN_SEEDS`` seeds or no spread (MAD 0)."""
    if len(values) < FAR_OFF_MIN_SEEDS:
        return []
    median = statistics.median(values.values())
    robust_std = 1.4826 * statistics.median(abs(v - median) for v in values.values())
    if robust_std == 0:
        return []
    found = [FarOff(seed, v, median, robust_std) for seed, v in sorted(values.items())]
    return [f for f in found if abs(f.z) > threshold]


def average_by_seed(per_task: Mapping[str, Mapping[int, float]]) -> dict[int, float]:
    """Per seed, the mean over tasks; only seeds present in every task (so the average is paired)."""
    seeds = set.intersection(*(set(v) for v in per_task.values())) if per_task else set()
    return {s: statistics.fmean(v[s] for v in per_task.values()) for s in sorted(seeds)}
