"""The attention kernels a bf16 CPU run can use, one layer forward + backward, side by side in one run.

    python benchmarks/attention_kernels.py [--rounds 20] [--threads 2]

Shapes of SmolLM2-135M on a batch of 8 RTE prompts (9 query / 3 key-value heads, head dim 64, 184
tokens, right padding with a causal mask): PyTorch's default SDPA in fp32 (what a `32` run uses), the
default (flash) and math SDPA backends in bf16 (with repeat_kv, as transformers calls them), and
``randmask_lab.experiment.compute.attention.folded``. Reported: the median over rounds, kernels interleaved.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench_stats import interleaved, timed
from randmask_lab.argtypes import positive_int
from randmask_lab.experiment.compute.attention import folded
from randmask_lab.machine import bf16_native, describe

B, HQ, HKV, T, D = 8, 9, 3, 184, 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=positive_int, default=20)
    parser.add_argument("--threads", type=positive_int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(60, T + 1, (B,), generator=gen)
    lengths[0] = T
    keep = torch.arange(T)[None, :] < lengths[:, None]
    mask = (torch.ones(T, T, dtype=torch.bool).tril()[None] & keep[:, None, :])[:, None]  # (B, 1, T, T)

    def tensors(dtype: torch.dtype):
        q = torch.randn(B, HQ, T, D, generator=gen).to(dtype).requires_grad_()
        k, v = (torch.randn(B, HKV, T, D, generator=gen).to(dtype).requires_grad_() for _ in range(2))
        return q, k, v, torch.randn(B, HQ, T, D, generator=gen).to(dtype)

    fp32, bf16 = tensors(torch.float32), tensors(torch.bfloat16)

    def sdpa(q, k, v, grad, backend=None) -> None:
        k, v = k.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1)
        if backend is None:  # PyTorch's own choice
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask).backward(grad)
            return
        with sdpa_kernel([backend]):
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask).backward(grad)

    kernels = {
        "fp32, default SDPA": lambda: sdpa(*fp32),
        "bf16, default SDPA (flash)": lambda: sdpa(*bf16, SDPBackend.FLASH_ATTENTION),
        "bf16, SDPA math": lambda: sdpa(*bf16, SDPBackend.MATH),
        "bf16, folded": lambda: folded(bf16[0], bf16[1], bf16[2], mask, True).backward(bf16[3]),
    }
    times = interleaved({name: timed(run) for name, run in kernels.items()}, args.rounds, warmup=3)
    print(f"one attention layer, forward + backward, {args.threads} threads, median of {args.rounds} rounds, "
          f"on {describe()}:")
    if not bf16_native("cpu"):
        print("(this CPU has no native bf16: its bf16 rows time emulated bf16 matmuls)")
    print("| kernel | ms |\n|---|---:|")
    for name, ts in times.items():
        print(f"| {name} | {1e3 * statistics.median(ts):.1f} |")


if __name__ == "__main__":
    main()
