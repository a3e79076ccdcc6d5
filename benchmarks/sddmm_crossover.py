"""Where should the masked weight gradient switch paths? Times every way side by side, in one run.

    python benchmarks/sddmm_crossover.py [--tokens 1024] [--threads 2] [--dtype fp32|bf16]

For each OPT-125m weight shape and density: the gather path (O(tokens * nnz) temporaries),
torch.sparse.sampled_addmm handed the raw (tokens, features) activations as before (it then copies
both operands into tokens-last layout itself), the compact path (we copy only the touched rows and
columns tokens-last, then sampled_addmm), the compiled kernel (randmask.native: reads g and x in place,
in token blocks; blank where no C compiler), and the dense g^T x then gather. Each time is the minimum of
--repeats runs (on a shared machine the minimum is the least disturbed run), shown relative to the
dense path, plus the path ``randmask.sddmm.sddmm`` picks. GATHER_MAX_NNZ, DENSE_GRAD_CROSSOVER,
NATIVE_DENSE_CROSSOVER (src/randmask/sddmm.py) and COMPACT_MAX_FRACTION (src/randmask/pattern.py) come from this table.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

from randmask import native, sddmm
from randmask.masks import bernoulli_mask, make_generator
from randmask.ops import SparsePattern
from randmask_lab.argtypes import positive_int
from randmask_lab.machine import describe

warnings.filterwarnings("ignore")


def min_ms(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def raw_sampled(g: torch.Tensor, x: torch.Tensor, pattern: SparsePattern) -> torch.Tensor:
    """The previous path: sampled_addmm on (out, T) and (T, in) views, in fp32."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        csr = torch.sparse_csr_tensor(
            torch.cat([torch.zeros(1, dtype=torch.int64),
                       torch.cumsum(torch.bincount(pattern.rows, minlength=pattern.shape[0]), 0)]),
            pattern.cols, torch.zeros(pattern.nnz), size=pattern.shape)
    return torch.sparse.sampled_addmm(csr, g.t().float(), x.float(), beta=0.0).values()


def time_paths(g: torch.Tensor, x: torch.Tensor, pattern: SparsePattern, repeats: int
               ) -> tuple[float, float, float, float]:
    """Minimum ms of (gather, raw sampled_addmm, compact, native kernel) for one pattern."""
    gather = (min_ms(lambda: sddmm.sddmm_gather(g, x, pattern, torch.float32), repeats)
              if pattern.nnz <= 30000 else float("nan"))
    sampled = min_ms(lambda: raw_sampled(g, x, pattern), repeats)
    compact = min_ms(lambda: sddmm.sddmm_compact(g, x, pattern, torch.float32), repeats)
    kernel = min_ms(lambda: sddmm.sddmm_native(g, x, pattern), repeats) if native.available() else float("nan")
    return gather, sampled, compact, kernel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=positive_int, default=1024)
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--repeats", type=positive_int, default=7)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="dtype of g and x")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    print(f"tokens={args.tokens} threads={args.threads} dtype={args.dtype}; times relative to dense g^T x; "
          f"on {describe()}, native kernel path: {native.compiled_path() or 'not built'}\n")
    print("| shape | density | nnz | dense ms | gather | sampled_addmm (raw) | compact | native | sddmm picks |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for out_f, in_f in [(768, 768), (3072, 768), (768, 3072)]:
        g = torch.randn(args.tokens, out_f).to(dtype)
        x = torch.randn(args.tokens, in_f).to(dtype)
        dense = min_ms(lambda g=g, x=x: g.t().float() @ x.float(), args.repeats)
        for p in [3e-5, 1e-4, 1e-3, 3e-3, 1e-2, 0.03, 0.1, 0.2, 0.4]:
            pattern = SparsePattern(bernoulli_mask((out_f, in_f), p, make_generator(0, "w")), (out_f, in_f))
            gather, sampled, compact, kernel = time_paths(g, x, pattern, args.repeats)
            print(f"| {out_f}x{in_f} | {p:g} | {pattern.nnz} | {dense:.1f} | {gather / dense:.3f} | "
                  f"{sampled / dense:.3f} | {compact / dense:.3f} | {kernel / dense:.3f} | "
                  f"{sddmm.weight_gradient_path(g, x, pattern)} |", flush=True)

if __name__ == "__main__":
    main()
