"""The native SDDMM kernel's vector paths side by side: the kernel alone, and its share of a training step.

    python benchmarks/native_paths.py [--rounds 12] [--threads 2] [--cpu-time] [--quick] [--no-step] [--json PATH]

Builds every path this CPU runs (``randmask.native.PATH_DEFINES``: its best, AVX-512 or AVX2 + FMA,
and the portable C; an AVX-512 CPU also runs the AVX2 one), then, in one process:

- kernel: the all-linear 1% weight gradients of one OPT-125m layer (four 768x768, fc1 3072x768,
  fc2 768x3072; 1024 tokens) from fp32 and from bf16 activations. Each round runs every path once,
  the order reversed every other round; a round's ratio is a path's time over the portable path's.
- step: the step benchmark's floor and randmask 1% all-linear (fp32; benchmarks/bench_models.py).
  Each round steps the floor once and the randmask model once per path (the loaded kernel swapped
  between steps); reported per path: the weight gradient's share of its step, and step / floor.

Ratios are per-round medians with a bootstrap 95% CI (benchmarks/bench_stats.py), never bare times.
Times are wall times; with ``--threads 1 --cpu-time`` they are the thread's CPU time, which other
processes on a busy machine inflate far less (they still share its caches and memory bandwidth).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

from bench_machine import json_path, save_json
from bench_stats import interleaved, paired_ratios, summarize
from randmask import native, ops
from randmask.masks import bernoulli_mask, make_generator
from randmask.ops import SparsePattern
from randmask_lab.argtypes import positive_int
from randmask_lab.machine import describe, machine_info

LAYER = [(768, 768)] * 4 + [(3072, 768), (768, 3072)]  # (out, in): q, k, v, out_proj, fc1, fc2
PATH_ORDER = ("avx512", "avx2", "portable")


def build_paths() -> dict:
    """{path: loaded library} for every path this CPU runs. Reaches into ``randmask.native``'s loader on
    purpose: a process normally loads one build, and a side-by-side timing needs them all at once."""
    saved = os.environ.get(native.PATH_ENV), native._tried, native._library
    libs = {}
    try:
        for asked in ("auto", "avx2", "portable"):
            os.environ[native.PATH_ENV] = asked
            native._tried, native._library = False, None
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "avx2" on a CPU without it builds the portable path
                if not native.available():
                    raise SystemExit("the native kernel did not build here (no C compiler?): nothing to compare")
            libs.setdefault(native.compiled_path(), native._library)
    finally:
        if saved[0] is None:
            os.environ.pop(native.PATH_ENV, None)
        else:
            os.environ[native.PATH_ENV] = saved[0]
        native._tried, native._library = saved[1], saved[2]
    return {p: libs[p] for p in PATH_ORDER if p in libs}


def use(lib) -> None:
    """Make ``lib`` the kernel ``randmask.ops`` calls."""
    native._tried, native._library = True, lib


def ratio_row(times: list[float], reference: list[float]) -> dict:
    s = summarize(paired_ratios(times, reference))
    return {"ratio": round(s.median, 4), "ci_low": round(s.ci_low, 4), "ci_high": round(s.ci_high, 4)}


def time_kernel(libs: dict, dtype: torch.dtype, tokens: int, rounds: int, clock, repeats: int = 3) -> dict:
    """One layer's weight gradients per path: the minimum of ``repeats`` runs per round, ratio to portable."""
    gen = torch.Generator().manual_seed(0)
    work = []
    for i, shape in enumerate(LAYER):
        pattern = SparsePattern(bernoulli_mask(shape, 1e-2, make_generator(0, f"layer.{i}")), shape)
        pattern.plan()  # built once, as in training (cached on the pattern)
        work.append((torch.randn(tokens, shape[0], generator=gen).to(dtype),
                     torch.randn(tokens, shape[1], generator=gen).to(dtype), pattern))

    def run(lib) -> float:
        use(lib)
        best = float("inf")
        for _ in range(repeats):
            t0 = clock()
            for g, x, pattern in work:
                ops.sddmm(g, x, pattern)
            best = min(best, clock() - t0)
        return best

    for g, x, pattern in work:
        assert ops.weight_gradient_path(g, x, pattern) == "native"
    times = interleaved({p: (lambda lib=lib: run(lib)) for p, lib in libs.items()}, rounds, warmup=1)
    return {p: {"ms_median": round(1e3 * statistics.median(t), 2), **ratio_row(t, times["portable"])}
            for p, t in times.items()}


def time_step(libs: dict, rounds: int, quick: bool, clock) -> dict:
    """Floor and randmask 1% all-linear fp32 steps, the latter once per path per round."""
    import copy

    from bench_models import batch_ids, build_base, make_step, make_variant
    from step_benchmark import SddmmTimer

    base = build_base(quick, "fp32")
    ids = batch_ids(base, quick)
    floor_step = make_step("floor", make_variant("floor", copy.deepcopy(base)), ids, "fp32")[0]
    masked_step = make_step("randmask 1% all-linear", make_variant("randmask 1% all-linear", base), ids, "fp32")[0]
    shares: dict[str, list[float]] = {p: [] for p in libs}

    with SddmmTimer(clock) as timer:
        def run(path: str | None) -> float:
            if path is not None:
                use(libs[path])
            timer.seconds = 0.0
            t0 = clock()
            (floor_step if path is None else masked_step)()
            elapsed = clock() - t0
            if path is not None:
                shares[path].append(timer.seconds / elapsed)
            return elapsed

        fns = {"floor": lambda: run(None), **{p: (lambda p=p: run(p)) for p in libs}}
        times = interleaved(fns, rounds, warmup=1)
    for p in libs:
        del shares[p][:-rounds]  # the warmup round's
    out = {}
    for p in libs:
        share = summarize(shares[p])
        out[p] = {"sddmm_share": round(share.median, 4), "share_ci_low": round(share.ci_low, 4),
                  "share_ci_high": round(share.ci_high, 4), "step_to_floor": ratio_row(times[p], times["floor"]),
                  "step_to_portable": ratio_row(times[p], times["portable"])}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=positive_int, default=12, help="timed rounds of each part (default 12)")
    parser.add_argument("--threads", type=positive_int, default=2, help="torch threads (default 2)")
    parser.add_argument("--tokens", type=positive_int, default=1024, help="tokens of the kernel part (default 1024)")
    parser.add_argument("--quick", action="store_true", help="the step part on the small (4x256) model")
    parser.add_argument("--no-step", action="store_true", help="the kernel part only")
    parser.add_argument("--cpu-time", action="store_true", help="time by the thread's CPU time (needs --threads 1)")
    parser.add_argument("--json", type=Path, default=None,
                        help="also write the results here ({cpu}: this CPU's kind, as in step_benchmark.py)")
    args = parser.parse_args(argv)
    if args.cpu_time and args.threads != 1:
        parser.error("--cpu-time measures the calling thread only: use it with --threads 1")
    torch.set_num_threads(args.threads)
    info = machine_info()
    saved = native._tried, native._library
    try:
        return run(args, info, build_paths())
    finally:
        native._tried, native._library = saved  # the process's own kernel, as it was


def run(args: argparse.Namespace, info: dict, libs: dict) -> int:
    clock, clock_name = (time.thread_time, "thread CPU time") if args.cpu_time else (time.perf_counter, "wall time")
    print(f"{describe(info)}; {args.threads} threads; {clock_name}; kernel paths built: {', '.join(libs)}")
    settings = {"rounds": args.rounds, "threads": args.threads, "clock": clock_name, "tokens": args.tokens,
                "quick": args.quick, "load_average_start": [round(x, 2) for x in os.getloadavg()]}
    result: dict = {"machine": info, "settings": settings, "kernel": {}}
    print(f"\nOne OPT-125m layer's all-linear 1% weight gradients, {args.tokens} tokens: time / portable path "
          f"(median of {args.rounds} paired rounds [95% CI])\n")
    print("| activations | " + " | ".join(libs) + " |\n|---|" + "---:|" * len(libs))
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        rows = result["kernel"][name] = time_kernel(libs, dtype, args.tokens, args.rounds, clock)
        print(f"| {name} | " + " | ".join(f"{r['ratio']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"
                                          for r in rows.values()) + " |", flush=True)
    if not args.no_step:
        model = "4x256 model, batch 4x64" if args.quick else "OPT-125m shapes, batch 8x128"
        print(f"\nrandmask 1% all-linear fp32 training step ({model}), per kernel path, {args.rounds} rounds\n")
        print("| path | weight-gradient share of the step [95% CI] | step / floor [95% CI] "
              "| step / portable [95% CI] |\n|---|---:|---:|---:|")
        result["step"] = time_step(libs, args.rounds, args.quick, clock)
        for p, r in result["step"].items():
            f, q = r["step_to_floor"], r["step_to_portable"]
            print(f"| {p} | {100 * r['sddmm_share']:.1f}% [{100 * r['share_ci_low']:.1f}, "
                  f"{100 * r['share_ci_high']:.1f}] | {f['ratio']:.3f} [{f['ci_low']:.3f}, {f['ci_high']:.3f}] | "
                  f"{q['ratio']:.3f} [{q['ci_low']:.3f}, {q['ci_high']:.3f}] |")
    if args.json:
        out = json_path(args.json)
        save_json(out, {"command": " ".join(["python", *sys.argv]), **result})
        print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
