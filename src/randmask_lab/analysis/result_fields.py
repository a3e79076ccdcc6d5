"""Checked reads of the fields of an analysis result file (``hessian.json``, ``suggest_lr.json``, ...).

The commands that read those files back (figure4, calibrate-lr) must never carry a damaged value into a
table, a mean or a fit: each field is checked (type, finite, range) and a bad one is a one-line RunError naming
the file, the field, what it holds, and the fix.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from randmask_lab.errors import RunError


def shown(value: Any) -> str:
    """A field's value as its JSON text, cut short (a crafted file can hold megabytes in one field)."""
    return json.dumps(value)[:40]


@dataclass(frozen=True)
class ResultFields:
    """The checks for one result file: ``path`` is named in every error, ``fix`` ends it."""

    path: Path
    fix: str

    def damaged(self, field: str, value: Any, want: str) -> RunError:
        """``<path>: <field> is <value>, <want>; the file is damaged: <fix>`` (``is missing`` for None)."""
        problem = "is missing" if value is None else f"is {shown(value)}, {want}"
        return RunError(f"{self.path}: {field} {problem}; the file is damaged: {self.fix}")

    def number(self, field: str, value: Any, *, low: float | None = None, above: float | None = None,
               high: float | None = None, integer: bool = False) -> float:
        """``value`` if a finite number (an int with ``integer``; a bool is neither) with ``low <= value``,
        ``value > above`` and ``value <= high`` where given; else the one-line RunError."""
        try:  # float() of a huge int overflows: that is damage too
            good = (not isinstance(value, bool) and isinstance(value, int if integer else (int, float))
                    and math.isfinite(float(value)))
        except OverflowError:
            good = False
        if not good:
            raise self.damaged(field, value, f"not {'an integer' if integer else 'a number'} (finite, in range)")
        if low is not None and value < low:
            raise self.damaged(field, value, f"below {low:g}")
        if above is not None and value <= above:
            raise self.damaged(field, value, f"not above {above:g}")
        if high is not None and value > high:
            raise self.damaged(field, value, f"above {high:g}")
        return value

    def optional(self, field: str, value: Any, kind: type) -> None:
        """Refuse a ``value`` that is neither null nor exactly ``kind`` (str, bool: a "yes" must not count as
        true)."""
        if value is not None and type(value) is not kind:
            raise self.damaged(field, value, f"not {kind.__name__} or null")


def refuse_mixed(sources: list[tuple[str, dict[str, Any]]], fields: dict[str, str], command: str) -> None:
    """Refuse measurements of several tasks or models (``fields``: field → how to pick one) among
    ``sources`` (``(where, values)`` pairs): rows keyed by method and budget would pool them as seeds of one cell,
    or plot one under the other's title. A source without a field (an older file) cannot be told apart and
    passes."""
    for field, option in fields.items():
        where: dict[str, str] = {}
        for source, values in sources:
            if values.get(field) is not None:
                where.setdefault(str(values[field]), source)
        if len(where) > 1:
            named = ", ".join(f"{value} ({source})" for value, source in sorted(where.items()))
            raise RunError(f"the measurements are of {len(where)} {field}s: {named}; {command} shows one {field}: "
                           f"{option}")


__all__ = ["ResultFields", "refuse_mixed", "shown"]
