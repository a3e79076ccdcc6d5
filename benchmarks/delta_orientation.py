"""The delta path's two SpMM orientations on CPU: the data behind randmask.delta's DENSE_FIRST_* thresholds.

    python benchmarks/delta_orientation.py [--quick] [--json PATH]

Per cell (token rows T, an (out, in) matrix, kept entries per output row), one "step" of the delta path as a
training layer runs it: the base output plus ``delta_matmul(x)`` (the forward), then ``delta_matmul(g,
transpose=True)`` (dx), each orientation forced through ``randmask.delta.DENSE_FIRST_MIN_OUTPUT``: CSR-first,
``(D @ x^T)^T`` (a transposed (T, out) view to add), against dense-first, ``torch.mm(x, csr(D^T))``. Reported:
the median per-round time ratio dense-first / CSR-first (rounds interleaved, benchmarks/bench_stats) with its
bootstrap 95% CI. Run it with background jobs paused.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import randmask.delta as delta  # noqa: E402
from bench_stats import interleaved, paired_ratios, summarize, timed  # noqa: E402
from randmask import atomic_write_bytes  # noqa: E402
from randmask.ops import SparsePattern  # noqa: E402

SHAPES = [(768, 768), (3072, 768), (768, 3072)]  # (out, in): OPT-125m's q/v, fc1, fc2
TOKENS = (64, 256, 1024, 4096)
PER_ROW = (0.25, 0.5, 1, 2, 4, 8)
WIDE = ((50272, 768), (256, 1024), 0.77)  # OPT-125m's LM head at 1e-3 of its entries


def _step(x: torch.Tensor, base: torch.Tensor, g: torch.Tensor, values: torch.Tensor, pattern: SparsePattern,
          first: bool):
    def run() -> None:
        delta.DENSE_FIRST_MIN_OUTPUT = 0 if first else 1 << 62  # the only switch: DENSE_FIRST_MAX_PER_ROW set huge
        base + delta.delta_matmul(x, values, pattern)  # noqa: B018 (the add is part of what is timed)
        delta.delta_matmul(g, values, pattern, transpose=True)

    return run


def cell(tokens: int, shape: tuple[int, int], per_row: float, rounds: int) -> dict:
    """Dense-first / CSR-first time of one cell, paired per round."""
    out_f, in_f = shape
    nnz = max(1, round(per_row * out_f))
    gen = torch.Generator().manual_seed(0)
    pattern = SparsePattern(torch.randperm(out_f * in_f, generator=gen)[:nnz].sort().values, shape)
    values = torch.randn(nnz, generator=gen)
    x, base, g = (torch.randn(tokens, n, generator=gen) for n in (in_f, out_f, out_f))
    calls = {name: timed(_step(x, base, g, values, pattern, name == "dense-first"))
             for name in ("csr-first", "dense-first")}
    times = interleaved(calls, rounds=rounds, warmup=2)
    summary = summarize(paired_ratios(times["dense-first"], times["csr-first"]))
    return {"tokens": tokens, "out": out_f, "in": in_f, "per_row": per_row, "nnz": nnz,
            "dense_first_over_csr_first": round(summary.median, 3),
            "ci95": [round(summary.ci_low, 3), round(summary.ci_high, 3)], "rounds": summary.rounds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one shape, two token counts, few rounds")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    from randmask_lab.machine import describe, machine_info

    saved = (delta.DENSE_FIRST_MIN_OUTPUT, delta.DENSE_FIRST_MAX_PER_ROW)
    delta.DENSE_FIRST_MAX_PER_ROW = 1 << 62
    machine = machine_info("cpu")
    print(describe(machine), f"threads={torch.get_num_threads()}")
    grid = [(t, s, r) for s in SHAPES[:1 if args.quick else None] for t in (TOKENS[1:3] if args.quick else TOKENS)
            for r in PER_ROW]
    grid += [(t, WIDE[0], WIDE[2]) for t in WIDE[1]] if not args.quick else []
    rows = []
    try:
        for tokens, shape, per_row in grid:
            rounds = 3 if args.quick else (20 if tokens * shape[0] <= 1 << 20 else 8)
            row = cell(tokens, shape, per_row, rounds)
            rows.append(row)
            print(f"T={tokens:<5} out={shape[0]:<6} in={shape[1]:<5} {per_row:>4g}/row: dense-first / csr-first "
                  f"{row['dense_first_over_csr_first']:.2f} [{row['ci95'][0]:.2f}, {row['ci95'][1]:.2f}]", flush=True)
    finally:
        delta.DENSE_FIRST_MIN_OUTPUT, delta.DENSE_FIRST_MAX_PER_ROW = saved
    if args.json:
        results = {"command": " ".join(["python", *sys.argv]), "machine": machine, "threads": torch.get_num_threads(),
                   "rows": rows}
        atomic_write_bytes(args.json, (json.dumps(results, indent=1) + "\n").encode())


if __name__ == "__main__":
    main()
