"""The settings that tell two runs of one table cell apart, so a report never pools them as seeds.

A report's cell is (model, protocol, task, method/budget): ``protocol_label`` and ``method_label`` name
what a study varies. Every other field of a run's identity (a method option such as LoRA's ``r``, the
targets, the head's modules or LR, weight decay, the schedule, the precision, ...) changes the result
too. Runs that differ in one of them are different cells: their row label names the fields that differ
(``lora [method_options={"r":16}]``), and a cell whose runs agree keeps its plain label.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from randmask_lab.experiment.results.record import RunRecord

# Every identity field of RunConfig outside the cell key, at its default, under its stored name (a record made
# before a field existed lacks it: it ran at its default). Written out rather than read from RunConfig, because
# results/ sits below run/ (tests/randmask_lab/experiment/test_packages.py); a test checks this table against
# RunConfig's fields, so a new identity field fails it until it is added here.
SETTING_DEFAULTS: dict[str, Any] = {
    "head_lr": None, "grad_accum": 1, "weight_decay": 0.0, "adam_betas": [0.9, 0.999], "adam_eps": 1e-08,
    "schedule": "constant", "warmup_steps": 0, "targets": None, "head_modules": None, "method_options": {},
    "max_length": 1024, "max_new_tokens": 50, "select_by": "val_loss", "eval_initial": False, "val_generate": False,
    "precision": "auto", "world_size": 1, "source": None, "max_steps": None,
}
# The fields the cell key names: the table's heading (protocol_label), the row (method_label), the column (task),
# the chosen LR and the seeds that the cell averages over.
IN_CELL_KEY = ("model", "task", "method", "ratio", "density", "quantize", "lr", "seed", "data_seed", "mask_seed",
               "order_seed", "n_train", "n_val", "n_test", "epochs", "batch_size", "group_by_length", "max_grad_norm",
               "mode")


def _as_number(value: Any) -> Any:
    """``value`` with each float that holds a whole number written as that int (``True`` stays a bool): JSON has one
    number type, so 0 and 0.0 are one setting. A study file rewritten by a JSON tool (jq writes 0.0 as 0) held runs
    "differing in weight_decay" that ran alike."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _as_number(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_as_number(v) for v in value]
    return value


def settings_of(config: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """(field, value as compact JSON, numbers compared as numbers) of every setting outside the cell key, a missing
    field at its default."""
    return tuple((name, json.dumps(_as_number(config.get(name, default)), sort_keys=True, separators=(",", ":")))
                 for name, default in SETTING_DEFAULTS.items())


def row_labels(records: Sequence[RunRecord], method_label: Any, protocol_label: Any) -> dict[int, str]:
    """Each record's row label, by ``id(record)``: ``method_label`` where its cell's runs share their settings,
    else that label and the settings that differ between them, e.g. ``lora [method_options={"r":1}]``."""
    cells: dict[tuple[str, str, str], list[RunRecord]] = defaultdict(list)
    for r in records:
        cells[(r.config["model"], protocol_label(r.config), method_label(r.config))].append(r)
    labels = {}
    for (_, _, label), runs in cells.items():
        settings = {id(r): settings_of(r.config) for r in runs}
        variants = set(settings.values())
        differing = [i for i in range(len(SETTING_DEFAULTS)) if len({v[i] for v in variants}) > 1]
        for r in runs:
            shown = ", ".join(f"{name}={value}" for name, value in (settings[id(r)][i] for i in differing))
            labels[id(r)] = f"{label} [{shown}]" if shown else label
    return labels


__all__ = ["IN_CELL_KEY", "SETTING_DEFAULTS", "row_labels", "settings_of"]
