"""What a benchmark says about the machine it ran on: which precisions fit it, file names by CPU kind, the kernel.

The fields themselves (CPU model, torch CPU capability, native bf16) come from ``randmask_lab.machine``.
"""

from __future__ import annotations

import json
from pathlib import Path

from randmask import native, ops
from randmask_lab.machine import cpu_kind


def choose_precisions(known: tuple[str, ...], asked: str | None, bf16_ok: bool
                      ) -> tuple[list[str], list[str], str | None]:
    """(precisions to time, precisions skipped, a line saying why or warning; None when there is nothing to say).

    Unasked (``asked`` None), every one of ``known`` runs where bf16 is native, and the others only
    elsewhere: without AMX or avx512_bf16 a bf16 matmul is emulated, many times slower than fp32, and
    the bf16 rows would take hours. Asked by name, a bf16 precision runs even there, with a warning line.
    """
    if asked is None:
        run = [p for p in known if bf16_ok or not p.startswith("bf16")]
        skipped = [p for p in known if p not in run]
        note = (f"skipping {', '.join(skipped)}: this CPU has no native bf16 (no AMX or avx512_bf16), so a bf16 "
                f"step runs many times slower than fp32; --precision {','.join(skipped)} runs them anyway"
                if skipped else None)
        return run, skipped, note
    run = [p.strip() for p in asked.split(",") if p.strip()]
    slow = [p for p in run if p.startswith("bf16")] if not bf16_ok else []
    note = (f"warning: timing {', '.join(slow)} on a CPU without native bf16: each bf16 step runs many times "
            "slower than fp32, so this takes far longer than fp32 alone" if slow else None)
    return run, [], note


def json_path(path: Path) -> Path:
    """``path`` with ``{cpu}`` replaced by this CPU's kind as a file-name part (``AVX2/no-bf16``: ``avx2-no-bf16``)."""
    return Path(str(path).replace("{cpu}", cpu_kind().lower().replace("/", "-")))


def save_json(path: Path, payload: object) -> None:
    """Write ``payload`` to ``path`` atomically (a half-written file never replaces the last good one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    tmp.replace(path)


def kernel_line() -> str:
    """Which weight-gradient kernel runs here: ``SDDMM kernel: native (avx2)``, or the torch path."""
    path = native.compiled_path()
    return f"SDDMM kernel: {ops.weight_gradient_kernel()}" + (f" ({path})" if path else "")
