"""Mixed-batch forwards under ``torch.compile`` against eager: a randmask PeftModel serving N adapters, one per row.

    python benchmarks/compile_mixed.py [--shape quick] [--adapters 8] [--batch 32] [--tokens 1 16] [--rounds 10]
                                       [--backend inductor] [--json PATH]

Model: benchmarks/bench_models.py's OPT shapes (random init, fp32, ``quick`` by default: 4 x 256). Adapters: N
randmask adapters at ratio 1e-3 on q/v with random values (benchmarks/mixed_batch.py's ``build``). A forward of
``--batch`` rows of T tokens (T = 1 is a decode step's shape without its cache, T = 16 a short prefill), under
``torch.no_grad``, every row naming one adapter.

Variants, for each T: the randmask model with ``adapter_names=`` eager and compiled, and the plain model eager and
compiled (the ceiling). Every round gives the randmask variants **a new mix of names** (a seeded shuffle), which is
what a server sees: the compiled model must not recompile for it, and the frames Dynamo compiled are reported. For
the peer, PEFT LoRA r=8 on q/v with the same adapters' count is compiled too and given ``--lora-mixes`` new mixes,
untimed: the frames it compiled are reported (PEFT's ``adapter_names`` path recompiles for a new list of names).
Timing: round-robin, order reversed every other round (benchmarks/bench_stats.py); per round, compiled / eager for
each model and randmask / plain in each mode; the median with a bootstrap 95% CI. Run it with background jobs paused.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
from torch._dynamo.testing import CompileCounterWithBackend

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from bench_models import SHAPES, build_base  # noqa: E402
from bench_stats import interleaved, paired_ratios, summarize, timed  # noqa: E402
from mixed_batch import assignment, build  # noqa: E402
from randmask import atomic_write_bytes  # noqa: E402
from randmask_lab.argtypes import non_negative_int, positive_int  # noqa: E402

PAIRS = {"randmask mixed: compiled / eager": ("randmask compiled", "randmask eager"),
         "plain: compiled / eager": ("plain compiled", "plain eager"),
         "eager: randmask mixed / plain": ("randmask eager", "plain eager"),
         "compiled: randmask mixed / plain": ("randmask compiled", "plain compiled")}


def forwards(shape: str, n_adapters: int, batch: int, tokens: int, backend: str
             ) -> tuple[dict[str, object], dict[str, CompileCounterWithBackend], float]:
    """Each variant's forward closure (a new mix of names per randmask call), the compiled variants' frame counters,
    and max |compiled - eager| of the randmask logits on a first mix."""
    torch._dynamo.reset()  # a fresh cache: frames compiled for other models must not count against its size limit
    base = build_base(False, "fp32", shape=shape).eval()
    adapted = build(copy.deepcopy(base), "randmask", n_adapters)
    ids = torch.randint(2, base.config.vocab_size, (batch, tokens), generator=torch.Generator().manual_seed(1))
    counters = {name: CompileCounterWithBackend(backend) for name in ("randmask compiled", "plain compiled")}
    compiled = {"randmask compiled": torch.compile(adapted, backend=counters["randmask compiled"]),
                "plain compiled": torch.compile(copy.deepcopy(base), backend=counters["plain compiled"])}
    mixes = iter(range(1, 1 << 30))

    def mixed(model) -> object:
        def run() -> None:
            with torch.no_grad():
                model(input_ids=ids, adapter_names=assignment(batch, n_adapters, seed=next(mixes)))
        return run

    def plain(model) -> object:
        def run() -> None:
            with torch.no_grad():
                model(input_ids=ids)
        return run

    with torch.no_grad():  # correctness first (this also compiles the randmask variant)
        names = assignment(batch, n_adapters, seed=0)
        error = float((compiled["randmask compiled"](input_ids=ids, adapter_names=names).logits
                       - adapted(input_ids=ids, adapter_names=names).logits).abs().max())
    calls = {"randmask eager": mixed(adapted), "randmask compiled": mixed(compiled["randmask compiled"]),
             "plain eager": plain(base), "plain compiled": plain(compiled["plain compiled"])}
    return calls, counters, error


def lora_frames(shape: str, n_adapters: int, batch: int, tokens: int, backend: str, mixes: int) -> int:
    """Frames Dynamo compiles for a PEFT LoRA model given ``mixes`` new mixes of names (untimed)."""
    torch._dynamo.reset()
    model = build(build_base(False, "fp32", shape=shape).eval(), "lora", n_adapters)
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(model, backend=counter)
    ids = torch.randint(2, model.config.vocab_size, (batch, tokens), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for seed in range(mixes):
            compiled(input_ids=ids, adapter_names=assignment(batch, n_adapters, seed=seed))
    return counter.frame_count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="quick")
    parser.add_argument("--adapters", type=positive_int, default=8)
    parser.add_argument("--batch", type=positive_int, default=32)
    parser.add_argument("--tokens", type=positive_int, nargs="+", default=[1, 16])
    parser.add_argument("--rounds", type=positive_int, default=10)
    parser.add_argument("--warmup", type=positive_int, default=2)
    parser.add_argument("--lora-mixes", type=non_negative_int, default=4,
                        help="new mixes of names given to compiled LoRA, untimed (0: skip)")
    parser.add_argument("--backend", default="inductor", help="torch.compile's backend (aot_eager: no codegen)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    backends = torch._dynamo.list_backends(exclude_tags=())
    if args.backend not in backends:
        parser.error(f"--backend {args.backend}: not a torch.compile backend; known: {', '.join(backends)}")
    import randmask.peft  # noqa: F401  (registers the PEFT method)
    from randmask_lab.machine import describe, machine_info

    machine = machine_info("cpu")
    print(describe(machine), f"threads={torch.get_num_threads()}", f"shape={args.shape}", f"backend={args.backend}",
          f"adapters={args.adapters}", f"batch={args.batch}", f"torch={torch.__version__}")
    runs = []
    for tokens in args.tokens:
        calls, counters, error = forwards(args.shape, args.adapters, args.batch, tokens, args.backend)
        times = interleaved({name: timed(call) for name, call in calls.items()}, args.rounds, args.warmup)
        frames = {name: counter.frame_count for name, counter in counters.items()}
        print(f"T={tokens}: max |compiled - eager| logits {error:.2e}; frames compiled over "
              f"{args.rounds + args.warmup + 1} mixes of names: {frames}")
        ratios = {}
        for label, (a, b) in PAIRS.items():
            s = summarize(paired_ratios(times[a], times[b]))
            ratios[label] = {"median": s.median, "ci95": [s.ci_low, s.ci_high], "rounds": s.rounds}
            print(f"  {label:34s} {s.median:.3f} [{s.ci_low:.3f}, {s.ci_high:.3f}]")
        run = {"tokens": tokens, "max_abs_logit_error": error, "frames": frames, "ratios": ratios}
        if args.lora_mixes > 0:
            run["lora_frames"] = lora_frames(args.shape, args.adapters, args.batch, tokens, args.backend,
                                             args.lora_mixes)
            print(f"  PEFT LoRA r=8 compiled: {run['lora_frames']} frames over {args.lora_mixes} mixes of names")
        runs.append(run)
    if args.json:
        results = {"command": " ".join(["python", *sys.argv]), "machine": machine, "torch": torch.__version__,
                   "threads": torch.get_num_threads(), "shape": args.shape, "backend": args.backend,
                   "adapters": args.adapters, "batch": args.batch, "runs": runs}
        atomic_write_bytes(args.json, (json.dumps(results, indent=1) + "\n").encode())


if __name__ == "__main__":
    main()
