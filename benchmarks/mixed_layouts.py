"""One masked layer's mixed-batch layouts against the plain layer: where the gathered layout stops paying.

    python benchmarks/mixed_layouts.py [--dim 768] [--adapters 8] [--rows 32] [--ratio 1e-3]
                                       [--tokens 1 4 16 32 64] [--rounds 21] [--compiled [--backend B]]
                                       [--device cpu|cuda] [--json PATH]

A (dim x dim) ``nn.Linear`` with ``--adapters`` randmask adapters at ``--ratio`` (random values), ``--rows`` rows of
T tokens, every adapter named equally often in a seeded shuffled order, fp32, ``torch.no_grad``. Variants, each a
call of ``randmask.mixed.mixed_forward`` (what a masked layer runs in a mixed batch):

    gathered            the gathered layout, the batch's slots made already (a decode step in ``generate``)
    gathered, new batch the gathered layout for a new batch each call: its rows grouped and given their slots in
                        the call (a model does that once per batch for all its layers; the layer keeps its tables)
    gathered, no slots  the gathered layout over the batch's own groups (``group_rows`` without ``with_slots``),
                        its tables built in every call: what the layer cache saves
    per group           one ``sparse_delta`` SpMM per adapter group

With ``--compiled``, two more, each ``mixed.traced_mixed_forward`` under ``torch.compile`` (inductor, compiled anew
for each length; the graph a compiled model runs in a mixed batch):

    compiled, gathered  the gathered layout, traced
    compiled, per group one SpMM per adapter group inside opaque custom ops (``randmask.compiled_mixed``): what
                        the compiled graph runs above ``TRACED_GATHERED_MAX_ELEMENTS``

each timed over the plain layer (the ceiling), per round, rounds interleaved (benchmarks/bench_stats.py): the
median ratio with a bootstrap 95% CI. Each row also gives rows x T x N (N: the largest adapter's entries) and the
layout ``mixed_forward`` picks at that size (``GATHERED_MAX_ELEMENTS``), the rule this benchmark checks. Run it
with background jobs paused.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from bench_stats import interleaved, paired_ratios, summarize  # noqa: E402
from bench_stats import timed as bench_timed  # noqa: E402
from randmask import MaskingConfig, apply_masking, atomic_write_bytes, masked_layers, mixed  # noqa: E402
from randmask_lab.argtypes import positive_float, positive_int  # noqa: E402

VARIANTS = ("gathered", "gathered, new batch", "gathered, no slots", "per group")
COMPILED = ("compiled, gathered", "compiled, per group")


def masked_layer(dim: int, n_adapters: int, ratio: float) -> nn.Module:
    """A masked (dim x dim) Linear with adapters a0..a{n-1} of random values."""
    model = nn.Sequential(nn.Linear(dim, dim))
    for i in range(n_adapters):
        apply_masking(model, MaskingConfig(targets=["0"], density=ratio, seed=i), adapter_name=f"a{i}")
    (layer,) = masked_layers(model).values()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for adapter in layer.adapters.values():
            adapter.values.copy_(torch.randn(adapter.nnz, generator=gen))
    layer.restore_base()  # W0 in the weight, as in a mixed batch
    return layer


def calls(layer: nn.Module, names: list[str], x: torch.Tensor, repeats: int, backend: str | None
          ) -> dict[str, object]:
    """Each variant's timed closure (``repeats`` forwards per call, so one call is well above the clock's grain);
    the compiled ones too when ``backend`` is given. On CUDA each is timed between two synchronizations."""
    def timed(fn: Callable[[], object]) -> Callable[[], float]:
        return bench_timed(fn, sync=torch.cuda.synchronize if x.is_cuda else None)

    known = list(layer.adapters)
    built = mixed.group_rows(names).with_slots(known)
    mixed.mixed_forward(layer.base_layer, x, layer.adapters, built)  # the layer builds its gathered tables

    def forced(limit: int, groups: Callable[[], mixed.RowGroups]) -> object:
        def run() -> None:
            saved, mixed.GATHERED_MAX_ELEMENTS = mixed.GATHERED_MAX_ELEMENTS, limit
            try:
                for _ in range(repeats):
                    mixed.mixed_forward(layer.base_layer, x, layer.adapters, groups())
            finally:
                mixed.GATHERED_MAX_ELEMENTS = saved
        return run

    def plain() -> None:
        for _ in range(repeats):
            layer.base_layer(x)

    gathered = 1 << 62
    variants = {"plain": timed(plain), "gathered": timed(forced(gathered, lambda: built)),
                "gathered, new batch": timed(forced(gathered, lambda: mixed.group_rows(names).with_slots(known))),
                "gathered, no slots": timed(forced(gathered, lambda: mixed.group_rows(names))),
                "per group": timed(forced(-1, lambda: built))}
    if backend is not None:
        torch._dynamo.reset()
        variants["compiled, gathered"] = timed(traced(layer, x, built, gathered, repeats, backend))
        variants["compiled, per group"] = timed(traced(layer, x, built, -1, repeats, backend))
    return variants


def traced(layer: nn.Module, x: torch.Tensor, groups: mixed.RowGroups, limit: int, repeats: int,
           backend: str) -> object:
    """``traced_mixed_forward`` compiled with ``TRACED_GATHERED_MAX_ELEMENTS`` at ``limit`` (Dynamo guards on it: each
    limit gets its own graph), checked against the eager layout before it is timed."""
    compiled = torch.compile(lambda x: mixed.traced_mixed_forward(layer.base_layer, x, layer.adapters, groups),
                             backend=backend)

    def call() -> torch.Tensor:
        saved, mixed.TRACED_GATHERED_MAX_ELEMENTS = mixed.TRACED_GATHERED_MAX_ELEMENTS, limit
        try:
            return compiled(x)
        finally:
            mixed.TRACED_GATHERED_MAX_ELEMENTS = saved

    error = (call() - mixed.mixed_forward(layer.base_layer, x, layer.adapters, groups)).abs().max().item()
    if error > 1e-4:
        raise SystemExit(f"compiled layout (limit {limit}) differs from eager by {error:.2e}")

    def run() -> None:
        for _ in range(repeats):
            call()
    return run


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; return what it writes to ``--json``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=positive_int, default=768)
    parser.add_argument("--adapters", type=positive_int, default=8)
    parser.add_argument("--rows", type=positive_int, default=32)
    parser.add_argument("--ratio", type=positive_float, default=1e-3)
    parser.add_argument("--tokens", type=positive_int, nargs="+", default=[1, 4, 16, 32, 64])
    parser.add_argument("--rounds", type=positive_int, default=21)
    parser.add_argument("--warmup", type=positive_int, default=2)
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--compiled", action="store_true", help="also time the layouts compiled")
    parser.add_argument("--backend", default="inductor", help="torch.compile's backend for --compiled")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.ratio >= 1:
        parser.error(f"--ratio {args.ratio}: the share of kept entries must be below 1 (e.g. 1e-3)")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this torch sees no CUDA device; run on a GPU machine, or leave --device out")
    if args.compiled and args.backend not in torch._dynamo.list_backends(exclude_tags=()):
        parser.error(f"--backend {args.backend!r} is not a torch.compile backend; pick one of "
                     f"{', '.join(torch._dynamo.list_backends())}")
    from randmask_lab.machine import describe, machine_info

    torch.set_num_threads(args.threads)
    layer = masked_layer(args.dim, args.adapters, args.ratio).to(args.device)
    width = max(a.nnz for a in layer.adapters.values())
    names = [f"a{i % args.adapters}" for i in range(args.rows)]
    random.Random(0).shuffle(names)
    command = " ".join(["python", "benchmarks/mixed_layouts.py", *(sys.argv[1:] if argv is None else argv)])
    result = {"command": command, "machine": machine_info(args.device), "threads": args.threads,
              "dim": args.dim, "adapters": args.adapters, "rows": args.rows, "ratio": args.ratio, "width": width,
              "gathered_max_elements": mixed.GATHERED_MAX_ELEMENTS,
              "traced_gathered_max_elements": mixed.TRACED_GATHERED_MAX_ELEMENTS,
              "compiled": args.backend if args.compiled else None, "runs": []}
    print(describe(result["machine"]), f"threads={args.threads}, fp32, {args.dim} x {args.dim}, {args.adapters} "
          f"adapters at {args.ratio} (N = {width}), {args.rows} rows, {args.rounds} rounds; over the plain layer")
    for tokens in args.tokens:
        x = torch.randn(args.rows, tokens, args.dim, generator=torch.Generator().manual_seed(tokens)).to(args.device)
        with torch.no_grad():
            times = interleaved(calls(layer, names, x, max(2, 64 // tokens), args.backend if args.compiled else None),
                                args.rounds, args.warmup)
        elements = args.rows * tokens * width
        row = {"tokens": tokens, "elements": elements,
               "default": "gathered" if elements <= mixed.GATHERED_MAX_ELEMENTS else "per group", "ratios": {}}
        for variant in [v for v in VARIANTS + COMPILED if v in times]:
            s = summarize(paired_ratios(times[variant], times["plain"]))
            row["ratios"][variant] = {"median": s.median, "ci95": [s.ci_low, s.ci_high], "rounds": s.rounds}
        result["runs"].append(row)
        if args.json:  # after each length: a run stopped later keeps what it measured
            atomic_write_bytes(args.json, (json.dumps(result, indent=1) + "\n").encode())
        print(f"T={tokens:>4} rows x T x N = {elements:>9,} (default: {row['default']}) | " + " | ".join(
            f"{v} {r['median']:.2f} [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]" for v, r in row["ratios"].items()),
            flush=True)
    return result


if __name__ == "__main__":
    main()
