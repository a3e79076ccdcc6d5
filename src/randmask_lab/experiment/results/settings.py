"""The settings that tell two runs of one table cell apart, so a report never pools them as seeds.

A report's cell is (model, protocol, task, method/budget): ``protocol_label`` and ``method_label`` name
what a study varies. Every other field of a run's identity (a method option such as LoRA's ``r``, the
targets, the head's modules or LR, weight decay, the schedule, the precision, ...) changes the result
too. Runs that differ in one of them are different cells: their row label names the fields that differ
(``lora [method_options={"r":16}]``), and a cell whose runs agree keeps its plain label.
"""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from randmask_lab.experiment.results.record import RunRecord
from randmask_lab.experiment.run.config import IDENTITY, OMITTED_AT_DEFAULT, ROLE, STORED_NAMES, RunConfig

# Named by the cell's other parts: the table's heading (protocol_label), the row (method_label), the column
# (task), the chosen LR and the seeds that the cell averages over.
_IN_CELL_KEY = {"model", "task", "method", "ratio", "density", "quantize", "lr", "seed", "data_seed", "mask_seed",
                "order_seed", "n_train", "n_val", "n_test", "epochs", "batch_size", "group_by_length", "max_grad_norm",
                "mode"}


def _defaults() -> dict[str, Any]:
    """Every other identity field of RunConfig at its default, under its stored name (records made before a field
    existed lack it: they ran at its default)."""
    out = {}
    for f in dataclasses.fields(RunConfig):
        name = STORED_NAMES.get(f.name, f.name)
        if f.metadata.get(ROLE) != IDENTITY[ROLE] or name in _IN_CELL_KEY:
            continue
        if name in OMITTED_AT_DEFAULT:  # world_size's default is the launcher's, which an old record never had
            default = OMITTED_AT_DEFAULT[name]
        else:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        out[name] = list(default) if isinstance(default, tuple) else default
    return out


SETTING_DEFAULTS = _defaults()


def settings_of(config: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """(field, value as compact JSON) of every setting outside the cell key, a missing field at its default."""
    return tuple((name, json.dumps(config.get(name, default), sort_keys=True, separators=(",", ":")))
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


__all__ = ["SETTING_DEFAULTS", "row_labels", "settings_of"]
