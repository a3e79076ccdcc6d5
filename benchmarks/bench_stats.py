"""Paired per-round ratios and their bootstrap confidence interval (the benchmark's statistics)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
