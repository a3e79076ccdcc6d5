"""Training-step time and memory of randmask vs its peers: paired ratios with CIs, memory per process.

    python benchmarks/step_benchmark.py [--quick] [--precision fp32,bf16-mixed,bf16-true] [--quantize nf4] [--json PATH]

PATH may hold ``{cpu}``, replaced by this CPU's kind (``randmask_lab.machine.cpu_kind``: e.g.
``avx2-no-bf16``), so that runs on different kinds of CPU write different files (``make bench`` does).
By default every precision is timed, except the bf16 ones on a CPU without native bf16 (oneDNN's own
check: no AMX or avx512_bf16), where a bf16 step runs many times slower than fp32: the run says it
skipped them, and ``--precision`` naming them runs them anyway. The JSON's ``settings.machine`` and the
printed tables name the CPU.

Model, variants and precisions: see benchmarks/bench_models.py (OPT-125m shapes, batch 8 x 128,
causal-LM loss, CPU). Two separate phases:

Timing: at each precision every variant is built in this one process and stepped round-robin, one
step each per round, the order reversed every other round. Each round gives a ratio per variant,
its step time over the floor's step time in that same round; we report the median of those ratios
and a bootstrap 95% CI of it. At least --rounds rounds after --warmup rounds, then more until every
CI is within +-2% of its median or --max-rounds. Nothing else runs in the process while timing.

Memory: each variant at each precision in a fresh subprocess (benchmarks/bench_memory.py): peak
resident set above the model's load, plus the exact bytes of gradients and optimizer state.

Also reported: the weight-gradient (SDDMM) share of randmask's step, and the time to draw the masks
of 80 matrices of 5120 x 5120 at p = 1e-3.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import shlex
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import torch

from bench_machine import choose_precisions, json_path, kernel_line, save_json
from bench_memory import measure_in_subprocess
from bench_models import (
    PRECISIONS,
    adapter_bytes,
    batch_ids,
    build_base,
    make_all,
    make_step,
    scope_of,
    state_bytes,
    trainable_count,
    variant_names,
)
from bench_stats import paired_ratios, summarize
from randmask import native, ops
from randmask.masks import bernoulli_mask, make_generator
from randmask_lab.argtypes import non_negative_int, positive_int
from randmask_lab.machine import bf16_native, describe, machine_info


class SddmmTimer:
    """Accumulates the time spent in ``randmask.ops.sddmm`` (the masked weight gradient): wall time, or
    ``clock``'s (``time.thread_time`` for a 1-thread run on a busy machine)."""

    def __init__(self, clock=time.perf_counter) -> None:
        self.seconds = 0.0
        self._inner = ops.sddmm
        self._clock = clock

    def __call__(self, *args):
        t0 = self._clock()
        out = self._inner(*args)
        self.seconds += self._clock() - t0
        return out

    def __enter__(self) -> SddmmTimer:
        ops.sddmm = self  # the op's backward looks the name up in ops at call time
        return self

    def __exit__(self, *exc) -> None:
        ops.sddmm = self._inner


def time_precision(precision: str, quick: bool, min_rounds: int, max_rounds: int, warmup: int,
                   ci_target: float, log=print, max_minutes: float | None = None,
                   only: list[str] | None = None, shape: str | None = None, batch: tuple[int, int] | None = None,
                   device: str = "cpu", quantize: str = "none", clock=time.perf_counter) -> list[dict]:
    """The timing phase at one precision: rows with ratio medians and CIs (memory filled in later).

    ``clock`` times the steps and the SDDMM share: wall time, or ``time.thread_time`` (``--cpu-time``: one
    thread's CPU time, which other processes on a busy machine inflate far less than wall time).

    ``max_minutes`` (of timed rounds) may stop it before ``min_rounds``: the rows then say ``time_capped``.
    ``shape``, ``batch``, ``device``: see ``bench_models.build_base`` / ``batch_ids`` (benchmarks/gpu uses them).
    On CUDA the SDDMM share is left out (the op's launches return before the GPU has run them).
    """
    base = build_base(quick, precision, shape, device, quantize)
    ids = batch_ids(base, quick, batch)
    models = make_all(base, precision, only, quantize)
    del base
    steps = {name: make_step(name, model, ids, precision) for name, model in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    sddmm_share: dict[str, list[float]] = {name: [] for name in models
                                           if name.startswith("randmask") and device == "cpu"}
    for _ in range(warmup):  # also creates the optimizer state
        for step, _, _ in steps.values():
            step()
    rounds, capped, t_start = 0, False, time.time()
    with SddmmTimer(clock) as timer:
        while True:
            order = list(steps) if rounds % 2 == 0 else list(reversed(steps))  # cancel position effects
            gc.collect()
            gc.disable()  # no collector pauses inside a timed step
            try:
                for name in order:
                    timer.seconds = 0.0
                    t0 = clock()
                    steps[name][0]()
                    elapsed = clock() - t0
                    times[name].append(elapsed)
                    if name in sddmm_share:
                        sddmm_share[name].append(timer.seconds / elapsed)
            finally:
                gc.enable()
            rounds += 1
            if max_minutes is not None and time.time() - t_start > 60 * max_minutes and rounds >= 3:
                capped = rounds < min_rounds
                log(f"[{precision}] round {rounds}: --max-minutes {max_minutes:g} reached")
                break
            if rounds < min_rounds:
                log(f"[{precision}] round {rounds}: floor {times['floor'][-1] * 1e3:.0f} ms")
                continue
            summaries = {n: summarize(paired_ratios(times[n], times["floor"])) for n in models if n != "floor"}
            worst = max(summaries.values(), key=lambda s: s.half_width)
            log(f"[{precision}] round {rounds}: floor {times['floor'][-1] * 1e3:.0f} ms, widest CI "
                f"+-{100 * worst.half_width:.1f}%")
            if worst.half_width <= ci_target or rounds >= max_rounds:
                break
    rows = []
    for name, model in models.items():
        ratio = summarize(paired_ratios(times[name], times["floor"]))
        lora = f"lora r=8 {scope_of(name)}"
        to_lora = statistics.median(paired_ratios(times[name], times[lora]))
        trainable = trainable_count(model)
        opt_bytes = state_bytes(steps[name][1])
        rows.append({
            "variant": name,
            "precision": precision,
            "quantize": quantize,
            "trainable": trainable,
            "step_ms_median": round(statistics.median(times[name]) * 1e3, 1),
            "ratio_to_floor": round(ratio.median, 4),
            "ratio_ci_low": round(ratio.ci_low, 4),
            "ratio_ci_high": round(ratio.ci_high, 4),
            "ratio_to_lora": round(to_lora, 4),
            "rounds": rounds,
            "time_capped": capped,
            "sddmm_share": round(statistics.median(sddmm_share[name]), 4) if name in sddmm_share else None,
            "optimizer_state_bytes": opt_bytes,
            "optimizer_bytes_per_trained_entry": round(opt_bytes / trainable, 2) if trainable else None,
            "adapter_bytes": adapter_bytes(name, model),
        })
    return rows


def time_masks(repeats: int = 5) -> float:
    """Median ms to draw Bernoulli(1e-3) masks for 80 matrices of 5120 x 5120 (a 13B model's q/v)."""
    def draw() -> None:
        for i in range(80):
            bernoulli_mask((5120, 5120), 1e-3, make_generator(0, f"layers.{i}"))

    draw()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        draw()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e3


def format_table(rows: list[dict]) -> str:
    head = ("| variant | trainable | ratio to floor [95% CI] | ratio to LoRA | SDDMM share | peak RSS MB "
            "(above load) | grads MB | optimizer B/entry | adapter B |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        share = f"{100 * r['sddmm_share']:.1f}%" if r["sddmm_share"] is not None else ""
        per_entry = f"{r['optimizer_bytes_per_trained_entry']:g}" if r["optimizer_bytes_per_trained_entry"] else ""
        lines.append(
            f"| {r['variant']} | {r['trainable']:,} | {r['ratio_to_floor']:.3f} [{r['ratio_ci_low']:.3f}, "
            f"{r['ratio_ci_high']:.3f}] | {r['ratio_to_lora']:.3f} | {share} | {r.get('peak_rss_total_mb', 0):.0f} "
            f"({r.get('peak_rss_mb', 0):.0f}) | {r.get('grad_bytes', 0) / 2**20:.1f} | {per_entry} | "
            f"{r['adapter_bytes']:,} |")
    return "\n".join(lines)


def check_targets(rows: list[dict]) -> list[dict]:
    """The issue's targets, each evaluated on the median (its CI alongside)."""
    by = {(r["precision"], r["variant"]): r for r in rows}
    checks = []
    for precision in dict.fromkeys(r["precision"] for r in rows):
        floor = by[(precision, "floor")]

        def add(what: str, holds: bool, detail: str, precision: str = precision) -> None:
            checks.append({"precision": precision, "target": what, "holds": bool(holds), "detail": detail})

        for r in (r for r in rows if r["precision"] == precision and r["variant"].startswith("randmask")):
            ci = f"{r['ratio_to_floor']:.3f} [{r['ratio_ci_low']:.3f}, {r['ratio_ci_high']:.3f}]"
            limit = 1.05 if scope_of(r["variant"]) == "all-linear" else 1.02
            add(f"{r['variant']} <= {limit}x floor", r["ratio_to_floor"] <= limit, ci)
            if scope_of(r["variant"]) == "all-linear":
                for peer in ("lora r=8 all-linear", "shira r=8 all-linear"):
                    p = by.get((precision, peer))
                    if p is not None:
                        add(f"{r['variant']} below {peer}", r["ratio_to_floor"] < p["ratio_to_floor"],
                            f"{r['ratio_to_floor']:.3f} vs {p['ratio_to_floor']:.3f}")
            add(f"{r['variant']} optimizer state 8 B/entry", r["optimizer_bytes_per_trained_entry"] == 8.0,
                f"{r['optimizer_bytes_per_trained_entry']} B/entry")
            if "peak_rss_total_mb" in r:
                add(f"{r['variant']} peak memory <= floor + 3%",
                    r["peak_rss_total_mb"] <= 1.03 * floor["peak_rss_total_mb"],
                    f"{r['peak_rss_total_mb']:.0f} MB vs floor {floor['peak_rss_total_mb']:.0f} MB "
                    f"({100 * (r['peak_rss_total_mb'] / floor['peak_rss_total_mb'] - 1):+.1f}%)")
            if r["sddmm_share"] is not None:
                limit = 0.05 if scope_of(r["variant"]) == "all-linear" else 0.02
                add(f"{r['variant']} weight gradient <= {100 * limit:g}% of the step",
                    r["sddmm_share"] <= limit, f"{100 * r['sddmm_share']:.1f}%")
    return checks


def add_memory(rows: list[dict], quick: bool, threads: int, jobs: int, log) -> None:
    """Fill in each row's memory from its own subprocess (``jobs`` at a time: each measures itself only)."""
    def one(r: dict) -> dict:
        log(f"memory: {r['variant']} at {r['precision']}")
        return measure_in_subprocess(r["variant"], r["precision"], quick, threads, r.get("quantize", "none"))

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for r, mem in zip(rows, pool.map(one, rows)):
            if r["optimizer_state_bytes"] != mem["optimizer_state_bytes"]:
                raise RuntimeError(f"{r['variant']}: optimizer state differs between the two phases")
            r.update({k: mem[k] for k in ("load_rss_mb", "peak_rss_mb", "peak_rss_total_mb", "grad_bytes",
                                          "hwm_reset")})


def write_json(path: Path, rows: list[dict], mask_ms: float, args, min_rounds: int, max_rounds: int,
               started: float, skipped: list[str]) -> None:
    payload = {
        "settings": {"command": args.command, "quick": args.quick, "threads": args.threads, "quantize": args.quantize,
                     "min_rounds": min_rounds, "clock": "thread CPU time" if args.cpu_time else "wall time",
                     "max_rounds": max_rounds, "warmup": args.warmup, "ci_target": args.ci_target,
                     "max_minutes": args.max_minutes, "budget_minutes": args.budget_minutes,
                     "skipped_precisions": skipped,
                     "torch": torch.__version__, "python": platform.python_version(),
                     "machine": machine_info(), "arch": platform.machine(), "cpus": os.cpu_count(),
                     # other processes' demand on the CPUs (1, 5, 15 min), at the start and now: a shared
                     # machine's ratios are as good as their CIs, and this says why those are wide
                     "load_average": {"start": args.load_at_start, "end": [round(x, 2) for x in os.getloadavg()]},
                     "sddmm_kernel": ops.weight_gradient_kernel(), "sddmm_kernel_path": native.compiled_path(),
                     "started_utc": datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="seconds"),
                     "minutes": round((time.time() - started) / 60, 1)},
        "mask_draw_ms_80x5120sq_p1e-3": round(mask_ms, 1),
        "rows": rows,
        "targets": check_targets(rows),
    }
    save_json(path, payload)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small model (4x256), batch 4x64, few rounds")
    parser.add_argument("--precision", default=None,
                        help=f"comma-separated subset of {','.join(PRECISIONS)} (default: all where bf16 is "
                             "native, else fp32 only)")
    parser.add_argument("--rounds", type=positive_int, default=None, help="minimum timed rounds (default 20; quick 3)")
    parser.add_argument("--max-rounds", type=positive_int, default=None, help="cap on rounds (default 40; quick 3)")
    parser.add_argument("--warmup", type=non_negative_int, default=2, help="untimed rounds first (default 2)")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="stop timing a precision after this many minutes even below --rounds (a shared "
                             "machine's deadline); its rows then say time_capped")
    parser.add_argument("--budget-minutes", type=float, default=None,
                        help="the timing phase's minutes over all precisions timed here, shared equally (make bench: "
                             "the same bound on a machine that times fp32 only and on one that times all three)")
    parser.add_argument("--variants", type=lambda s: [v.strip() for v in s.split(",")], default=None,
                        help="comma-separated subset of variants (the floor and LoRA references are always in)")
    parser.add_argument("--ci-target", type=float, default=0.02, help="stop once every CI is within this")
    parser.add_argument("--quantize", default="none", choices=("none", "nf4", "fp4", "int8", "ao-int8"),
                        help="store the base quantized (the runner's --quantize; CPU schemes); LoRA is then QLoRA")
    parser.add_argument("--threads", type=positive_int, default=2, help="torch threads (default 2)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time the thread's CPU time instead of wall time (needs --threads 1): a busy shared "
                             "machine inflates it far less; the time budget stays in wall minutes")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-process memory phase")
    parser.add_argument("--memory-jobs", type=positive_int, default=3, help="memory subprocesses at a time (default 3)")
    parser.add_argument("--json", type=Path, default=None, help="also write rows, targets and settings here")
    args = parser.parse_args(argv)
    # the command that printed these numbers, kept in the JSON beside them
    if args.cpu_time and args.threads != 1:
        parser.error("--cpu-time measures one thread's CPU time: use it with --threads 1")
    args.command = shlex.join(["python", "benchmarks/step_benchmark.py", *(sys.argv[1:] if argv is None else argv)])
    precisions, skipped, note = choose_precisions(PRECISIONS, args.precision, bf16_native("cpu"))
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown:
        parser.error(f"unknown precision {unknown}; use a subset of {','.join(PRECISIONS)}")
    for precision in precisions:
        known = variant_names(precision, args.quantize)
        unknown = sorted(set(args.variants or []) - set(known))
        if unknown:
            parser.error(f"unknown variants {unknown} at {precision}; known: {', '.join(known)}")
    if args.budget_minutes is not None:
        share = args.budget_minutes / len(precisions)
        args.max_minutes = share if args.max_minutes is None else min(args.max_minutes, share)
    min_rounds = args.rounds or (3 if args.quick else 20)
    max_rounds = max(min_rounds, args.max_rounds or (3 if args.quick else 40))
    torch.set_num_threads(args.threads)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    started = time.time()
    args.load_at_start = [round(x, 2) for x in os.getloadavg()]
    print(f"on {describe()}; {kernel_line()}", flush=True)
    if note:
        print(note, flush=True)
    out = json_path(args.json) if args.json else None

    mask_ms = time_masks()
    log(f"masks for 80 x 5120^2 at p=1e-3: {mask_ms:.1f} ms")
    rows: list[dict] = []
    for precision in precisions:  # each precision complete (time, then memory) before the next
        done = time_precision(precision, args.quick, min_rounds, max_rounds, args.warmup, args.ci_target, log,
                              args.max_minutes, args.variants, quantize=args.quantize,
                              clock=time.thread_time if args.cpu_time else time.perf_counter)
        if not args.no_memory:
            add_memory(done, args.quick, args.threads, args.memory_jobs, log)
        rows += done
        if out:  # after every precision, so an interrupted run keeps what it finished
            write_json(out, rows, mask_ms, args, min_rounds, max_rounds, started, skipped)
    for precision in precisions:
        print(f"\n### {precision} (on {describe()})\n")
        print(format_table([r for r in rows if r["precision"] == precision]))
    print(f"\nmasks for 80 matrices of 5120x5120 at p=1e-3: {mask_ms:.1f} ms (target <= 50 ms)")
    print("\n| precision | target | holds | measured |\n|---|---|---|---|")
    for t in check_targets(rows):
        print(f"| {t['precision']} | {t['target']} | {'yes' if t['holds'] else 'NO'} | {t['detail']} |")
    if skipped:
        print(f"\nnot timed here: {', '.join(skipped)} (no native bf16 on this CPU)")
    print(f"\n{(time.time() - started) / 60:.1f} minutes" + (f"; wrote {out}" if out else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
