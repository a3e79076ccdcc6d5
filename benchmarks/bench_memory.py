"""Peak memory of one variant, measured in a process of its own.

    python benchmarks/bench_memory.py VARIANT PRECISION [--quick] [--quantize nf4]   (prints one JSON line)

The process builds the model and the variant, notes its resident set (the "load"), resets the kernel's
high-water mark (``/proc/self/clear_refs``), runs training steps and reads ``VmHWM``: the peak resident
set, so gradients, optimizer state and activations all count, whatever their allocator. Nothing samples
while it runs. Where the reset is not possible the peak is ``ru_maxrss`` and covers the load as well
(``hwm_reset`` says which).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

from bench_models import batch_ids, build_base, make_step, make_variant, state_bytes, trainable_count
from randmask_lab.argtypes import positive_int

STEPS = 2  # step 1 creates the optimizer state; step 2 runs forward/backward with it alive


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def measure(variant: str, precision: str, quick: bool, threads: int = 2, quantize: str = "none") -> dict:
    import peft  # noqa: F401  -- every child imports the same modules, so the loads compare
    import transformers  # noqa: F401

    import randmask  # noqa: F401

    torch.set_num_threads(threads)
    model = make_variant(variant, build_base(quick, precision, quantize=quantize))
    ids = batch_ids(model, quick)
    step, opt, record = make_step(variant, model, ids, precision)
    load_kb = _status_kb("VmRSS")
    reset = load_kb is not None and _reset_peak()
    for _ in range(STEPS):
        step()
    if reset:
        peak_kb = _status_kb("VmHWM")
    else:  # ru_maxrss: KiB on Linux; the peak since the process began
        peak_kb, load_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, 0
    return {
        "variant": variant,
        "precision": precision,
        "trainable": trainable_count(model),
        "load_rss_mb": round(load_kb / 1024, 1),
        "peak_rss_mb": round((peak_kb - load_kb) / 1024, 1),  # above the load
        "peak_rss_total_mb": round(peak_kb / 1024, 1),
        "grad_bytes": record["grad_bytes"],
        "optimizer_state_bytes": state_bytes(opt),
        "hwm_reset": reset,
    }


def measure_in_subprocess(variant: str, precision: str, quick: bool, threads: int = 2, quantize: str = "none") -> dict:
    """Run ``measure`` in a fresh interpreter (so no other variant's memory is in its resident set)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), variant, precision, "--threads", str(threads),
           "--quantize", quantize]
    if quick:
        cmd.append("--quick")
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory run of {variant!r} at {precision} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variant")
    parser.add_argument("precision")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--quantize", default="none")
    args = parser.parse_args(argv)
    from randmask_lab.machine import machine_info  # after measure(): not part of the measured load

    measured = measure(args.variant, args.precision, args.quick, args.threads, args.quantize)
    print(json.dumps({**measured, "machine": machine_info()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
