"""A 1024x768x3072 matmul in fp32, bf16 and fp16, side by side: is half precision native on this CPU?

On an AVX2-only CPU torch 2.13 has no fast bf16/fp16 GEMM, and half precision runs tens of times slower than
fp32; with AMX or avx512_bf16 bf16 runs faster. The runner's ``--precision auto`` decides by oneDNN's own check
(``randmask_lab.machine.cpu_bf16_native``); this prints the ratios that check stands for, with the machine.

    python benchmarks/matmul_dtypes.py [--threads 2] [--rounds 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from bench_stats import interleaved, timed
from randmask_lab.argtypes import positive_int
from randmask_lab.machine import describe, machine_info

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--rounds", type=positive_int, default=5, help="paired rounds: each times every dtype once")
    parser.add_argument("--shape", type=positive_int, nargs=3, default=(1024, 768, 3072), metavar=("M", "K", "N"))
    parser.add_argument("--json", help="write the per-round times and ratios here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    m, k, n = args.shape
    a, b = torch.randn(m, k), torch.randn(k, n)
    pairs = {name: (a.to(dt), b.to(dt)) for name, dt in DTYPES.items()}
    # paired rounds after one warm-up round (oneDNN picks and caches its kernels): a load that comes and goes
    # hits every dtype alike
    times = interleaved({name: timed(lambda x=x, y=y: x @ y) for name, (x, y) in pairs.items()}, args.rounds,
                        warmup=1)
    print(f"{m}x{k}x{n} matmul, {args.threads} threads, {args.rounds} paired rounds on {describe()}")
    out = {"machine": machine_info(), "shape": [m, k, n], "threads": args.threads, "seconds": times, "ratio": {}}
    for name in ("bf16", "fp16"):
        ratios = [h / f for h, f in zip(times[name], times["fp32"])]
        out["ratio"][name] = ratios
        print(f"  {name} / fp32: median {statistics.median(ratios):.1f}x (rounds {min(ratios):.1f}-{max(ratios):.1f}x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
