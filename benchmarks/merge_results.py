"""Merge step-benchmark JSONs run separately (e.g. one process per precision) into one file.

    python benchmarks/merge_results.py OUT.json IN1.json IN2.json ...

Rows are concatenated in input order (a precision may appear in only one input), the targets are
re-evaluated over all rows, and each input's settings are kept under ``runs``. Inputs measured on
different kinds of CPU (``settings.machine.cpu_kind``) are refused.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench_machine import save_json
from step_benchmark import check_targets


def _cpu_kind(settings: dict) -> str:
    machine = settings.get("machine")
    return machine.get("cpu_kind", "unknown") if isinstance(machine, dict) else "not recorded"


def merge(inputs: list[Path]) -> dict:
    payloads = [json.loads(p.read_text()) for p in inputs]
    for path, payload in zip(inputs, payloads):
        if not isinstance(payload, dict) or not isinstance(payload.get("settings"), dict) or "rows" not in payload:
            raise SystemExit(f"{path} is not one step-benchmark run (no 'settings' and 'rows'; a merged file keeps "
                             "its runs under 'runs'): give the runs it came from")
    rows = [r for p in payloads for r in p["rows"]]
    seen = [(r["precision"], r["variant"]) for r in rows]
    if len(seen) != len(set(seen)):
        raise SystemExit("the inputs overlap: a (precision, variant) row appears twice")
    kinds = {_cpu_kind(p["settings"]) for p in payloads}
    if len(kinds) > 1:  # one table, one kind of CPU: ratios from an AVX2 and an AMX machine do not mix
        raise SystemExit(f"the inputs were measured on different kinds of CPU ({', '.join(sorted(kinds))}); "
                         "merge runs of one kind only")
    return {
        "runs": [{"file": str(path), **p["settings"]} for path, p in zip(inputs, payloads)],
        "mask_draw_ms_80x5120sq_p1e-3": [p["mask_draw_ms_80x5120sq_p1e-3"] for p in payloads],
        "rows": rows,
        "targets": check_targets(rows),
    }


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        raise SystemExit(__doc__)
    out, inputs = Path(argv[0]), [Path(a) for a in argv[1:]]
    save_json(out, merge(inputs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
