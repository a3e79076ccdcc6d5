"""The masked weight gradient alone, at OPT-1.3b's weight shapes: Triton vs cuSPARSE vs gather vs dense g^T x.

Part of ``benchmarks/gpu/run.sh`` (driver.py calls :func:`run`). Per (shape, density): g and x are bf16
(tokens, features); every way is timed in each round right after dense g^T x (bf16 GEMM, then the kept
entries gathered), the order of the ways turned every round, and each round gives a ratio to that round's
dense time; rows report the median ratio and a bootstrap 95% CI (bench_stats). Each way's values are
checked against fp32 dense g^T x at the kept entries (max relative error over the largest entry).

    sampled_addmm: randmask's compact path (touched rows/columns tokens-last in fp32, then
                   torch.sparse.sampled_addmm, i.e. cuSPARSE: it has no half-precision path);
    gather:        randmask's gather path (O(tokens x nnz) temporaries; skipped above GATHER_MAX_NNZ);
    triton:        randmask.triton_sddmm (RANDMASK_KERNEL=triton).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from bench_stats import paired_ratios, summarize
from randmask import kernels, sddmm
from randmask.masks import bernoulli_mask, make_generator
from randmask.ops import SparsePattern

SHAPES = [(2048, 2048), (8192, 2048), (2048, 8192)]  # (out, in): q/k/v/out_proj, fc1, fc2 of OPT-1.3b
DENSITIES = [1e-5, 1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1]
GATHER_MAX_NNZ = 200_000  # above this the gather path's O(tokens x nnz) work takes seconds per call
TINY = {"shapes": [(48, 32), (32, 96)], "densities": [3e-2, 3e-1], "tokens": 20}  # --dry-run (Triton interpreted)


def _timer(device: str) -> Callable[[Callable[[], object]], float]:
    """Seconds one call takes: CUDA events on a GPU, perf_counter on the CPU."""
    if device == "cuda":
        def timed(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        return timed

    def timed_cpu(fn):
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    return timed_cpu


def ways(g: torch.Tensor, x: torch.Tensor, pattern: SparsePattern, triton_ok: bool) -> dict[str, Callable]:
    """The ways to compute the masked gradient: name -> zero-argument call returning (nnz,) values."""
    out: dict[str, Callable] = {
        "dense": lambda: (g.t() @ x).reshape(-1)[pattern.indices],  # (out, in) in the input dtype, as autograd does
        "sampled_addmm": lambda: sddmm.sddmm_compact(g, x, pattern, torch.float32),
    }
    if pattern.nnz <= GATHER_MAX_NNZ:
        out["gather"] = lambda: sddmm.sddmm_gather(g, x, pattern, torch.float32)
    if triton_ok:
        out["triton"] = lambda: sddmm.sddmm_triton(g, x, pattern)
    return out


def run(device: str, dry_run: bool, rounds: int, log=print) -> list[dict]:
    """Rows of the SDDMM table (see the module doc)."""
    shapes, densities, tokens = ((TINY["shapes"], TINY["densities"], TINY["tokens"]) if dry_run
                                 else (SHAPES, DENSITIES, 4096))
    dtype = torch.bfloat16
    try:
        triton_ok = kernels.triton_kernel(required=False) is not None and (device == "cuda" or dry_run)
    except Exception:  # noqa: BLE001 -- a triton that does not load: the row says so
        triton_ok = False
    timed = _timer(device)
    rows = []
    for out_f, in_f in shapes:
        gen = torch.Generator().manual_seed(0)
        g = torch.randn(tokens, out_f, generator=gen).to(device, dtype)
        x = torch.randn(tokens, in_f, generator=gen).to(device, dtype)
        reference = g.float().t() @ x.float()  # (out, in) fp32
        for p in densities:
            pattern = SparsePattern(bernoulli_mask((out_f, in_f), p, make_generator(0, "w")).to(device), (out_f, in_f))
            if pattern.nnz == 0:
                continue
            calls = ways(g, x, pattern, triton_ok)
            expected = reference.reshape(-1)[pattern.indices]
            scale = float(expected.abs().max()) or 1.0
            errors = {name: float((fn().float() - expected).abs().max()) / scale for name, fn in calls.items()}
            names = [n for n in calls if n != "dense"]
            pairs: dict[str, list[tuple[float, float]]] = {name: [] for name in names}  # (way, dense) seconds
            for r in range(rounds):
                for name in names[r % len(names):] + names[:r % len(names)]:  # the order turns every round
                    dense = timed(calls["dense"])  # right before: the pair shares the GPU's state
                    pairs[name].append((timed(calls[name]), dense))
            for name in names:
                mine, dense = [t for t, _ in pairs[name]], [d for _, d in pairs[name]]
                s = summarize(paired_ratios(mine, dense))
                rows.append({"shape": f"{out_f}x{in_f}", "density": p, "nnz": pattern.nnz, "tokens": tokens,
                             "way": name, "ratio_to_dense": round(s.median, 4), "ci_low": round(s.ci_low, 4),
                             "ci_high": round(s.ci_high, 4), "ms": round(1e3 * sorted(mine)[rounds // 2], 4),
                             "dense_ms": round(1e3 * sorted(dense)[rounds // 2], 4),
                             "max_rel_error": errors[name]})
            log(f"sddmm {out_f}x{in_f} p={p:g}: " + ", ".join(
                f"{r['way']} {r['ratio_to_dense']:.3f}" for r in rows[-len(names):]))
    return rows


def table(rows: list[dict]) -> str:
    """Markdown: one row per (shape, density), one column per way (ratio to dense [95% CI])."""
    ways_seen = list(dict.fromkeys(r["way"] for r in rows))
    lines = ["| shape | density | nnz | dense ms | " + " | ".join(ways_seen) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(ways_seen)]
    keyed = {(r["shape"], r["density"], r["way"]): r for r in rows}
    for shape, p in dict.fromkeys((r["shape"], r["density"]) for r in rows):
        first = next(r for r in rows if r["shape"] == shape and r["density"] == p)
        cells = []
        for way in ways_seen:
            r = keyed.get((shape, p, way))
            cells.append("" if r is None else f"{r['ratio_to_dense']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]")
        lines.append(f"| {shape} | {p:g} | {first['nnz']:,} | {first['dense_ms']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
