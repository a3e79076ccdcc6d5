"""What a line of a study file must hold: every field the study code reads, of its type and range.

The tables, cells, findings, forecast and plan read these fields and do arithmetic, sorting and set
algebra on them; a field of another type (a seed given as "0", a metric of NaN or 56.3, a config
without its model) would end in a traceback or, worse, a silently wrong table. ``record_problem``
names the first such field, so ``read_jsonl`` can refuse the line with its file and line number.
"""

from __future__ import annotations

import math
from typing import Any

from randmask_lab.argtypes import MAX_LR, MAX_SEED

STATUSES = ("done", "diverged", "scale_collapsed", "failed")


def _int(x: Any, low: int = 0) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= low


def _seed(x: Any) -> bool:
    return _int(x) and x <= MAX_SEED  # what `randmask train --seed` takes


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _fraction(x: Any) -> bool:
    return x is None or (_number(x) and 0 <= x <= 1)


def _budget(x: Any) -> bool:
    return x is None or (_number(x) and 0 < x <= 1)


def _seconds(x: Any) -> bool:
    return x is None or (_number(x) and x >= 0)


# Top-level fields besides run_id/config/status/metric (read_jsonl checks those): name -> (check, what it must be).
_RECORD = {
    "val_metric": (_fraction, "a metric in [0, 1] or null"),
    "test_metric": (_fraction, "a metric in [0, 1] or null"),
    "best_epoch": (lambda x: x is None or _int(x), "an epoch number >= 0 or null"),
    "trainable": (_int, "a count >= 0"),
    "total": (_int, "a count >= 0"),
    "notes": (lambda x: isinstance(x, list) and all(isinstance(n, str) for n in x), "a list of strings"),
    "epochs": (lambda x: isinstance(x, list) and all(_epoch_ok(e) for e in x), "a list of epoch records"),
    "code_version": (lambda x: isinstance(x, dict), "an object"),
    "earlier_code_versions": (lambda x: isinstance(x, list) and all(isinstance(v, dict) for v in x),
                              "a list of objects"),
    "data": (lambda x: isinstance(x, dict), "an object"),
    "machine": (lambda x: isinstance(x, dict), "an object"),
    "trainable_report": (lambda x: isinstance(x, dict), "an object"),
    "created": (lambda x: isinstance(x, str), "a string"),
    "run_dir": (lambda x: isinstance(x, str), "a string"),
    "attention": (lambda x: isinstance(x, str), "a string"),
    "error": (lambda x: x is None or isinstance(x, str), "a string or null"),
    **{k: (_seconds, "a number of seconds >= 0 or null") for k in ("wall_seconds", "train_seconds", "cpu_seconds",
                                                                    "carried_seconds", "carried_cpu_seconds")},
}
# Config fields the study reads (cells, protocol labels, plan): name -> (check, what it must be, required).
_CONFIG = {
    "model": (lambda x: isinstance(x, str) and x != "", "a model name", True),
    "task": (lambda x: isinstance(x, str) and x != "", "a task name", True),
    "method": (lambda x: isinstance(x, str) and x != "", "a method name", True),
    "lr": (lambda x: _number(x) and 0 < x <= MAX_LR, f"a learning rate in (0, {MAX_LR:g}]", True),
    "seed": (_seed, "an int seed in [0, 2**63 - 1]", True),
    "ratio": (_budget, "a fraction in (0, 1] or null", False),
    "density": (_budget, "a fraction in (0, 1] or null", False),
    "n_train": (_int, "a count >= 0", True),
    "n_val": (_int, "a count >= 0", True),
    "n_test": (_int, "a count >= 0", True),
    "epochs": (lambda x: _int(x, 1), "an int >= 1", True),
    "batch_size": (lambda x: _int(x, 1), "an int >= 1", True),
    "mode": (lambda x: isinstance(x, str), "a string", True),
    "group_by_length": (lambda x: isinstance(x, bool), "true or false", False),
    "precision": (lambda x: isinstance(x, str), "a string", False),
    **{k: (lambda x: x is None or _seed(x), "an int seed in [0, 2**63 - 1] or null", False)
       for k in ("data_seed", "mask_seed", "order_seed")},
}


def _epoch_ok(entry: Any) -> bool:
    """An epoch record: an object whose step count (an int) and seconds (a number) are right where present."""
    return (isinstance(entry, dict) and (entry.get("steps") is None or _int(entry["steps"]))
            and _seconds(entry.get("seconds")) and all(v is None or isinstance(v, (str, bool)) or _number(v)
                                                       for v in entry.values()))


def record_problem(row: dict[str, Any]) -> str | None:
    """The first field of a study-file record (already a dict with a config dict) that the study cannot use."""
    if not isinstance(row["run_id"], str) or not row["run_id"]:
        return "has a run_id that is not a non-empty string"
    if row["status"] not in STATUSES:
        return f"has status {str(row['status'])[:30]!r}, not one of {', '.join(STATUSES)}"
    if not isinstance(row["metric"], str):
        return "has a metric name that is not a string"
    for key, (ok, want) in _RECORD.items():
        if key in row and not ok(row[key]):
            return f"has {key} = {str(row[key])[:40]!r}; it must be {want}"
    config = row["config"]
    for key, (ok, want, required) in _CONFIG.items():
        if key not in config:
            if required:
                return f"has a config without {key!r}"
        elif not ok(config[key]):
            return f"has config.{key} = {str(config[key])[:40]!r}; it must be {want}"
    return None


__all__ = ["STATUSES", "record_problem"]
