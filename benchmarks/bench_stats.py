"""Interleaved timing rounds, paired per-round ratios and their bootstrap confidence interval (the
benchmarks' statistics)."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import torch

T = TypeVar("T")


@dataclass(frozen=True)
class RatioSummary:
    """Median of per-round ratios with a percentile-bootstrap 95% CI of that median."""

    median: float
    ci_low: float
    ci_high: float
    rounds: int

    @property
    def half_width(self) -> float:
        """Largest distance from the median to a CI end, relative to the median (0.02 = +-2%)."""
        return max(self.median - self.ci_low, self.ci_high - self.median) / self.median


def interleaved(calls: Mapping[str, Callable[[], T]], rounds: int, warmup: int = 0,
                on_round: Callable[[int, dict[str, list[T]]], None] | None = None) -> dict[str, list[T]]:
    """Each call's result in every round: a round calls each once, in the given order on even rounds and
    reversed on odd ones, so a drift in the machine's speed within a round hits every call alike.

    ``warmup`` rounds run first and their results are dropped. The garbage collector runs before each round
    and is off during it, so its pauses land on no call. ``on_round(r, results)`` follows timed round ``r``.
    """
    if rounds < 1 or warmup < 0:
        raise ValueError(f"need rounds >= 1 and warmup >= 0, got rounds={rounds}, warmup={warmup}")
    names = list(calls)
    results: dict[str, list[T]] = {name: [] for name in names}
    for r in range(warmup + rounds):
        gc.collect()
        gc.disable()
        try:
            for name in (names if r % 2 == 0 else names[::-1]):
                result = calls[name]()
                if r >= warmup:
                    results[name].append(result)
        finally:
            gc.enable()
        if r >= warmup and on_round is not None:
            on_round(r - warmup, results)
    return results


def timed(fn: Callable[[], object], clock: Callable[[], float] = time.perf_counter,
          sync: Callable[[], None] | None = None) -> Callable[[], float]:
    """``fn`` made to return its seconds by ``clock``; ``sync`` (e.g. ``torch.cuda.synchronize``) runs before the
    clock starts and before it stops, so an asynchronous device's queued work is counted where it belongs."""

    def run() -> float:
        if sync is not None:
            sync()
        start = clock()
        fn()
        if sync is not None:
            sync()
        return clock() - start

    return run


def paired_ratios(times: list[float], reference: list[float]) -> list[float]:
    """Per-round ratio t_variant / t_reference: round r's two steps ran back to back, so slow phases
    of a shared machine hit both and largely cancel, unlike a ratio of separate medians."""
    if len(times) != len(reference) or not times:
        raise ValueError(f"need the same non-zero number of rounds, got {len(times)} and {len(reference)}")
    return [t / r for t, r in zip(times, reference)]


def summarize(ratios: list[float], n_boot: int = 4000, seed: int = 0) -> RatioSummary:
    """Median ratio and the 2.5/97.5 percentiles of the bootstrapped median (rounds resampled)."""
    data = torch.tensor(ratios, dtype=torch.float64)
    n = data.numel()
    gen = torch.Generator().manual_seed(seed)
    resampled = data[torch.randint(0, n, (n_boot, n), generator=gen)]  # (n_boot, n)
    medians = torch.quantile(resampled, 0.5, dim=1)
    low, high = torch.quantile(medians, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return RatioSummary(float(torch.quantile(data, 0.5)), low, high, n)
