"""The paper's own numbers for OPT-125m (Xu & Zhang, ICML 2024, Table 5, which holds Table 1's rows and
Appendix B.1's baselines), verbatim, for the tables and figures that put a study beside them.

These are published reference values, never results of this project: every table and figure that shows
them labels them as the paper's. The paper's Masking rows are at its ratios of all parameters
(``PAPER_RATIOS``); its baselines are keyed by the lab's method names.
"""

from __future__ import annotations

PAPER_MODEL = "OPT-125m"
# The paper's protocol, for captions: 1000 train / 500 validation / up to 1000 test, 5 epochs, batch 8, best of an
# LR grid, 3 runs averaged (Appendix B.1).
PAPER_PROTOCOL = "1000 train / 500 val / ≤1000 test, 5 epochs, batch 8, mean of 3 runs"

PAPER_RATIOS = (1e-1, 5e-2, 1e-2, 5e-3, 1e-3, 5e-4, 1e-4, 5e-5, 1e-5)

# OPT-125m, Table 5 (test metric x100): task -> {row: value}. Rows: a method name, or "randmask <ratio>".
_COLUMNS = ("sst2", "rte", "cb", "boolq")
_ROWS = {
    "full": (88.1, 63.5, 81.0, 62.9),
    "adapter": (86.0, 62.3, 69.0, 62.7),
    "lora": (86.5, 59.9, 82.1, 63.6),
    "adalora": (87.7, 62.3, 69.6, 63.2),
    "prefix": (88.1, 58.5, 69.6, 63.9),
    "bitfit": (86.5, 60.0, 70.8, 62.7),
    "randmask 1e-01": (87.3, 63.7, 89.9, 64.2),
    "randmask 5e-02": (87.0, 65.7, 78.6, 63.7),
    "randmask 1e-02": (87.6, 62.1, 81.5, 63.9),
    "randmask 5e-03": (87.0, 64.4, 84.5, 63.7),
    "randmask 1e-03": (87.3, 60.8, 82.7, 63.6),
    "randmask 5e-04": (86.9, 61.6, 84.5, 63.7),
    "randmask 1e-04": (86.1, 59.1, 73.8, 62.9),
    "randmask 5e-05": (86.9, 57.9, 74.4, 63.8),
    "randmask 1e-05": (84.7, 56.1, 70.8, 61.6),
}
PAPER_OPT125M: dict[str, dict[str, float]] = {
    task: {row: values[i] for row, values in _ROWS.items()} for i, task in enumerate(_COLUMNS)
}


def paper_value(task: str, label: str) -> float | None:
    """The paper's OPT-125m value (x100) for a task and a study row label (``lora``, ``randmask 1e-03``, ...)."""
    return PAPER_OPT125M.get(task, {}).get(label)
