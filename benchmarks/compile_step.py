"""Training-step time under ``torch.compile`` against eager, for randmask and PEFT LoRA, side by side in one process.

    python benchmarks/compile_step.py [--shape quick] [--device cpu] [--rounds 10] [--json PATH]

Model and step: benchmarks/bench_models.py (OPT shapes, random init, causal-LM loss, fp32; ``--shape`` picks the
shape, ``quick`` by default: a 4 x 256 model, so that inductor's compile of each variant takes a minute or two on a
CPU). Variants: randmask 0.1% on q/v, and PEFT LoRA r=8 on q/v, each eager and ``torch.compile(model)``
(inductor, the default backend): the forward and backward are compiled, the AdamW step is not. Each compiled
variant compiles in its warm-up steps (the time that took is reported apart).

Timing: every variant is built first and stepped round-robin, one step each per round, the order reversed every
other round. Reported, per round: compiled / eager for each method, and randmask / LoRA in each mode; the median of
those ratios with a bootstrap 95% CI (benchmarks/bench_stats.py). Run it with background jobs paused.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from bench_models import SHAPES, batch_ids, build_base, make_step, make_variant  # noqa: E402
from bench_stats import interleaved, paired_ratios, summarize, timed  # noqa: E402
from randmask import atomic_write_bytes  # noqa: E402
from randmask_lab.argtypes import positive_int  # noqa: E402

METHODS = ("randmask 0.1% q/v", "lora r=8 q/v")
MODES = ("eager", "compiled")


def build(shape: str, device: str, backend: str) -> tuple[dict[tuple[str, str], object], dict[tuple[str, str], float]]:
    """Every (method, mode)'s step closure, and each compiled variant's seconds to compile (its first step)."""
    import copy

    base = build_base(False, "fp32", shape=shape, device=device)
    ids = batch_ids(base, shape == "quick")
    steps, compile_seconds = {}, {}
    for method in METHODS:
        for mode in MODES:
            model = make_variant(method, copy.deepcopy(base))
            step, _, _ = make_step(method, torch.compile(model, backend=backend) if mode == "compiled" else model,
                                 ids, "fp32")
            start = time.perf_counter()
            step()  # the compiled variant compiles here
            if mode == "compiled":
                compile_seconds[(method, mode)] = time.perf_counter() - start
            steps[(method, mode)] = step
    return steps, compile_seconds


def time_rounds(steps: dict, rounds: int, warmup: int, device: str) -> dict[tuple[str, str], list[float]]:
    """Seconds per step of every variant, ``rounds`` rounds after ``warmup`` untimed ones, order reversed each round."""
    sync = torch.cuda.synchronize if device == "cuda" else None
    return interleaved({key: timed(step, sync=sync) for key, step in steps.items()}, rounds, warmup)


def report(times: dict) -> dict[str, dict]:
    """The paired ratios: compiled / eager per method, and randmask / LoRA per mode."""
    pairs = {f"{method}: compiled / eager": ((method, "compiled"), (method, "eager")) for method in METHODS}
    pairs.update({f"{mode}: randmask / lora": ((METHODS[0], mode), (METHODS[1], mode)) for mode in MODES})
    out = {}
    for name, (a, b) in pairs.items():
        s = summarize(paired_ratios(times[a], times[b]))
        out[name] = {"median": s.median, "ci95": [s.ci_low, s.ci_high], "rounds": s.rounds}
        print(f"{name:32s} {s.median:.3f} [{s.ci_low:.3f}, {s.ci_high:.3f}] over {s.rounds} rounds")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="quick")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=positive_int, default=10)
    parser.add_argument("--warmup", type=positive_int, default=2)
    parser.add_argument("--backend", default="inductor", help="torch.compile's backend (aot_eager: no codegen)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.device not in ("cpu", "cuda") or (args.device == "cuda" and not torch.cuda.is_available()):
        parser.error(f"--device {args.device}: use cpu, or cuda on a machine with a CUDA GPU")
    backends = torch._dynamo.list_backends(exclude_tags=())
    if args.backend not in backends:
        parser.error(f"--backend {args.backend}: not a torch.compile backend; known: {', '.join(backends)}")
    from randmask_lab.machine import describe, machine_info

    machine = machine_info(args.device)
    print(describe(machine), f"threads={torch.get_num_threads()}", f"shape={args.shape}",
          f"backend={args.backend}", f"torch={torch.__version__}")
    steps, compile_seconds = build(args.shape, args.device, args.backend)
    for (method, _), seconds in compile_seconds.items():
        print(f"{method}: compile and first step {seconds:.1f} s")
    ratios = report(time_rounds(steps, args.rounds, args.warmup, args.device))
    if args.json:
        results = {"command": " ".join(["python", *sys.argv]), "machine": machine, "torch": torch.__version__,
                   "threads": torch.get_num_threads(), "shape": args.shape, "backend": args.backend,
                   "compile_and_first_step_seconds": {m: s for (m, _), s in compile_seconds.items()},
                   "ratios": ratios}
        atomic_write_bytes(args.json, (json.dumps(results, indent=1) + "\n").encode())


if __name__ == "__main__":
    main()
