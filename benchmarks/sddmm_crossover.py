"""Where should the masked weight gradient switch paths? Times the three ways, side by side.

    python benchmarks/sddmm_crossover.py [--tokens 1024]

For each shape and density: a plain gather (O(tokens * nnz) memory), torch.sparse.sampled_addmm
on a CSR pattern, and the dense g^T x then gather. Prints times relative to the dense path; the
thresholds GATHER_MAX_NNZ and DENSE_GRAD_CROSSOVER in src/randmask/ops.py come from this table.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from randmask.masks import bernoulli_mask, make_generator
from randmask.ops import SparsePattern, sddmm_differentiable

warnings.filterwarnings("ignore")


def median_ms(fn, repeats: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def time_paths(g: torch.Tensor, x: torch.Tensor, pattern: SparsePattern) -> tuple[float, float, float]:
    """Median ms of (gather, sampled_addmm, dense) for one pattern."""
    csr = pattern.csr_template(torch.float32)
    dense = median_ms(lambda: (g.t() @ x).reshape(-1)[pattern.indices])
    sampled = median_ms(lambda: torch.sparse.sampled_addmm(csr, g.t(), x, beta=0.0).values())
    gather = median_ms(lambda: sddmm_differentiable(g, x, pattern)) if pattern.nnz <= 30000 else float("nan")
    return gather, sampled, dense


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1024)
    args = parser.parse_args()
    print("| shape | density | nnz | gather / dense | sampled_addmm / dense |")
    print("|---|---:|---:|---:|---:|")
    for out_f, in_f in [(768, 768), (3072, 768)]:
        g = torch.randn(args.tokens, out_f)
        x = torch.randn(args.tokens, in_f)
        for p in [1e-5, 1e-4, 1e-3, 1e-2, 0.05, 0.1, 0.2, 0.4]:
            pattern = SparsePattern(bernoulli_mask((out_f, in_f), p, make_generator(0, "w")), (out_f, in_f))
            gather, sampled, dense = time_paths(g, x, pattern)
            print(f"| {out_f}x{in_f} | {p:g} | {pattern.nnz} | {gather / dense:.3f} | {sampled / dense:.3f} |")


if __name__ == "__main__":
    main()
