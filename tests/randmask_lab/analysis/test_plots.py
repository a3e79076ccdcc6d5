"""The analysis plots write readable PNGs from plain numbers."""

from __future__ import annotations

from randmask_lab.analysis.plots import plot_distance, plot_lambda_max, plot_power_trace

RATIOS = [1e-5, 1e-4, 1e-3, 1e-2]
LAMBDA = [{"method": "randmask", "ratio": r, "before": 40 * r ** 0.3, "after": 30 * r ** 0.3} for r in RATIOS] + [
    {"method": "lora", "ratio": 2.35e-3, "before": 9.0, "after": 7.5},
    {"method": "full", "ratio": 1.0, "before": 60.0, "after": 0.0},  # a non-positive value is skipped
]
DIST = [{"method": "randmask", "ratio": r, "distance": 2 * r ** -0.3} for r in RATIOS] + [
    {"method": "full", "ratio": 1.0, "distance": 0.8}]


def _is_png(path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_write_pngs(tmp_path):
    assert _is_png(plot_lambda_max(LAMBDA, tmp_path / "lambda_max.png", task="SST-2"))
    assert _is_png(plot_distance(DIST, tmp_path / "distance.png", task="SST-2"))
    trace = [3.0, 4.5, 4.9, 4.99, 4.999]
    assert _is_png(plot_power_trace(trace, tmp_path / "trace.png", tol=1e-3))
    runs = {"before training": trace, "after training": [1.0, 1.5, 1.55, 1.551], "empty": []}
    assert _is_png(plot_power_trace(runs, tmp_path / "sub" / "traces.png"))
