"""A study spec's JSON checked before any of it is used: types, ranges and names, one RunError each.

``StudySpec.from_file`` calls :func:`check_spec_file` first: the file is read through the bounded reader
(a symlink to /dev/zero, a FIFO or a huge file is refused unread), parsed strictly (NaN, Infinity and
deep nesting refused) and every field checked by :func:`check_spec_data`. So an LR of 1e300, a seed of
1e30, ``max_extend: "x"`` or a protocol key the runner does not know is a one-line error naming the
file and the field, never a traceback or a study that runs with it.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from randmask import loads_strict, read_limited
from randmask_lab.argtypes import MAX_LR, MAX_SEED
from randmask_lab.errors import RunError
from randmask_lab.experiment.run.config import RunConfig
from randmask_lab.experiment.run.options import SET_BY_RUNNER
from randmask_lab.methods import MASK_KIND_OF, METHOD_NAMES

MAX_SPEC_BYTES = 1 << 20
TOP_LEVEL = {"name", "model", "precision", "protocol", "cells", "seeds", "search_seed", "max_extend", "common",
             "reestimate"}  # (a top-level "stage" was accepted and never read: a stage belongs to a cell)
MAX_STAGE = 100
REESTIMATE_KEYS = {"compare", "half_width", "max_seeds"}
MAX_REESTIMATED_SEEDS = 1000
CELL_KEYS = {"method", "lrs", "ratio", "tasks", "seeds", "stage"}
# RunConfig fields a spec's protocol/common may set: not the ones each planned run sets itself (model, task,
# method, budget, lr, seeds, precision, out_dir) or the execution options of `randmask study` (threads, ...).
_SET_BY_THE_PLAN = {"model", "task", "method", "ratio", "trainable_ratio", "lr", "seed", "data_seed", "mask_seed",
                    "order_seed", "precision", "out_dir", "store", "threads", "progress", "lease_seconds"}
# (store: the study plans from <out-dir>/results.sqlite; a run writing elsewhere would never count, and run again)
_SET_BY_THE_RUNNER = {f.name for f in dataclasses.fields(RunConfig) if f.metadata.get(SET_BY_RUNNER)}
RUN_FIELDS = {f.name for f in dataclasses.fields(RunConfig)} - _SET_BY_THE_PLAN - _SET_BY_THE_RUNNER
LADDER_STEPS = 16  # the 1-3-10 LR ladder has 16 points: no grid can be extended further


def _int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _fail(path: str | Path, problem: str) -> RunError:
    return RunError(f"study spec {path}: {problem}. See experiments/*.json for the format.")


def _seeds(path: str | Path, where: str, seeds: Any) -> None:
    if not (isinstance(seeds, list) and seeds and all(_int(s) and 0 <= s <= MAX_SEED for s in seeds)):
        raise _fail(path, f"{where} must be a non-empty list of integer seeds in [0, 2**63 - 1], got "
                          f"{str(seeds)[:60]}")
    if len(set(seeds)) != len(seeds):
        raise _fail(path, f"{where} {seeds} repeats a seed")


def _run_fields(path: str | Path, where: str, fields: Any) -> None:
    if not isinstance(fields, dict):
        raise _fail(path, f"{where} must be an object of run options, got {str(fields)[:60]}")
    unknown = sorted(set(fields) - RUN_FIELDS)
    if unknown:
        raise _fail(path, f"{where} sets {unknown}, which a spec cannot set (unknown, or set by the plan itself: "
                          f"{', '.join(sorted(_SET_BY_THE_PLAN | _SET_BY_THE_RUNNER))})")


def _cell(path: str | Path, n: int, cell: Any, tasks: set[str]) -> None:
    where = f"cells[{n}]"
    if not isinstance(cell, dict):
        raise _fail(path, f"{where} must be an object, got {str(cell)[:60]}")
    unknown = sorted(set(cell) - CELL_KEYS)
    if unknown:
        raise _fail(path, f"{where} has unknown keys {unknown} (known: {', '.join(sorted(CELL_KEYS))})")
    if not (isinstance(cell.get("method"), str) and cell["method"]):
        raise _fail(path, f"{where} needs a method name, got {str(cell.get('method'))[:40]!r}")
    if cell["method"] not in METHOD_NAMES:
        raise _fail(path, f"{where}: unknown method {cell['method']!r} (known: {', '.join(METHOD_NAMES)})")
    stage = cell.get("stage", 0)
    if not (_int(stage) and 0 <= stage <= MAX_STAGE):
        raise _fail(path, f"{where} ({cell['method']}): stage must be an integer in [0, {MAX_STAGE}], got {stage!r}")
    lrs = cell.get("lrs", [])
    if not (isinstance(lrs, list) and all(_number(lr) and 0 < lr <= MAX_LR for lr in lrs)):
        raise _fail(path, f"{where} ({cell['method']}): lrs must be a list of learning rates in (0, {MAX_LR:g}], "
                          f"got {str(lrs)[:60]}")
    ratio = cell.get("ratio")
    masking = cell["method"] in MASK_KIND_OF
    if masking and not (_number(ratio) and 0 < ratio <= 1):  # absent, the run's default budget would never match it
        raise _fail(path, f"{where} ({cell['method']}): a masking cell needs its ratio, a fraction in (0, 1], got "
                          f"{ratio!r}")
    if not masking and ratio is not None:
        raise _fail(path, f"{where} ({cell['method']}): ratio applies to {' and '.join(MASK_KIND_OF)} cells only; "
                          "drop it")
    if cell["method"] == "zeroshot" and lrs:
        raise _fail(path, f"{where} (zeroshot): a zero-shot cell trains nothing, so it takes no lrs; drop them")
    if cell.get("tasks") is not None:
        if not (isinstance(cell["tasks"], list) and cell["tasks"] and all(isinstance(t, str) for t in cell["tasks"])):
            raise _fail(path, f"{where} ({cell['method']}): tasks must be a non-empty list of task names")
        if set(cell["tasks"]) - tasks:
            raise _fail(path, f"{where} ({cell['method']}) names tasks {sorted(set(cell['tasks']) - tasks)} "
                              "with no protocol")
    if "seeds" in cell:
        _seeds(path, f"{where}.seeds", cell["seeds"])


def _reestimate(path: str | Path, rule: Any) -> None:
    if not isinstance(rule, dict):
        raise _fail(path, f"reestimate must be an object, got {str(rule)[:60]}")
    unknown = sorted(set(rule) - REESTIMATE_KEYS)
    if unknown:
        raise _fail(path, f"reestimate has unknown keys {unknown} (known: {', '.join(sorted(REESTIMATE_KEYS))})")
    compare = rule.get("compare")
    if not (isinstance(compare, list) and compare and all(
            isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) and x for x in pair)
            for pair in compare)):
        raise _fail(path, 'reestimate.compare must be a non-empty list of [left, right] cell labels, e.g. '
                          f'[["randmask 1e-03", "lora"]], got {str(compare)[:60]}')
    width = rule.get("half_width", 0.01)
    if not (_number(width) and 0 < width <= 1):
        raise _fail(path, f"reestimate.half_width must be a fraction in (0, 1] (0.01: 1 point), got {width!r}")
    most = rule.get("max_seeds")
    if not (_int(most) and 2 <= most <= MAX_REESTIMATED_SEEDS):
        raise _fail(path, f"reestimate.max_seeds must be an integer in [2, {MAX_REESTIMATED_SEEDS}] (the cap on "
                          f"the compute it may add), got {most!r}")


def check_spec_data(data: dict, path: str | Path) -> None:
    """RunError naming ``path`` and the first field of a parsed spec that no study can run with."""
    if not isinstance(data, dict):
        raise _fail(path, f"the file holds a {type(data).__name__}, not an object")
    unknown = sorted(set(data) - TOP_LEVEL)
    if unknown:
        raise _fail(path, f"unknown keys {unknown} (known: {', '.join(sorted(TOP_LEVEL))})")
    for key in ("name", "model", "precision"):
        if not (isinstance(data.get(key), str) and data[key]):
            raise _fail(path, f"{key} must be a non-empty string, got {str(data.get(key))[:40]!r}")
    protocol = data.get("protocol")
    if not (isinstance(protocol, dict) and protocol and all(isinstance(t, str) and t for t in protocol)):
        raise _fail(path, "protocol must be an object of task name -> run options, naming at least one task")
    for task, fields in protocol.items():
        _run_fields(path, f"protocol[{task!r}]", fields)
    _run_fields(path, "common", data.get("common", {}))
    cells = data.get("cells")
    if not (isinstance(cells, list) and cells):
        raise _fail(path, "cells must be a non-empty list")
    seen: dict[tuple, list[tuple[int, set[str]]]] = {}
    for n, cell in enumerate(cells):
        _cell(path, n, cell, set(protocol))
        key, tasks = (cell["method"], cell.get("ratio")), set(cell.get("tasks") or protocol)
        for other, other_tasks in seen.get(key, []):
            if tasks & other_tasks:  # the plan would list each run twice, and a table has one row per cell
                raise _fail(path, f"cells[{n}] repeats cells[{other}] ({cell['method']}"
                                  f"{' ' + format(cell['ratio'], 'g') if cell.get('ratio') is not None else ''}) on "
                                  f"{', '.join(sorted(tasks & other_tasks))}: one cell per method and ratio on a task")
        seen.setdefault(key, []).append((n, tasks))
    _seeds(path, "seeds", data.get("seeds", [0, 1, 2]))
    search = data.get("search_seed", 0)
    if not (_int(search) and 0 <= search <= MAX_SEED):
        raise _fail(path, f"search_seed must be an integer seed, got {search!r}")
    extend = data.get("max_extend", 2)
    if not (_int(extend) and 0 <= extend <= LADDER_STEPS):
        raise _fail(path, f"max_extend must be an integer in [0, {LADDER_STEPS}], got {extend!r}")
    if "reestimate" in data:
        _reestimate(path, data["reestimate"])


def check_spec_file(path: str | Path) -> dict:
    """The spec's JSON, read bounded and strict, after :func:`check_spec_data`."""
    text = read_limited(path, MAX_SPEC_BYTES, "study spec", error=RunError,
                        fix="pass a study spec (JSON); see experiments/*.json for the format")
    try:  # strict: NaN, Infinity and 1e400 are not JSON (an LR of Infinity would otherwise pass as a float)
        data = loads_strict(text.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, the constants
        raise _fail(path, f"{type(e).__name__}: {str(e)[:100]}") from None
    check_spec_data(data, path)
    return data


__all__ = ["CELL_KEYS", "RUN_FIELDS", "TOP_LEVEL", "check_spec_data", "check_spec_file"]
