"""The masked weight gradient as a Triton kernel (the GPU path; optional extra ``randmask[gpu]``).

``randmask.ops`` imports this module only when it picks the Triton kernel (``RANDMASK_KERNEL``, see
``ops.weight_gradient_kernel``), so ``import randmask`` never imports triton. The kernel computes

    out[e] = sum_t lhs[t, f(r)] * rhs[t, h(col[e])]    for every entry e of CSR row r

over the CSR that ``SparsePattern.plan()`` builds: the kept entries grouped by lhs feature (the output
feature whenever at least as many outputs as inputs are touched, which is every Linear of a decoder
except the down projection), so one program loads one row of the lhs (a column of dL/dy) per token
block and reuses it for up to ``BLOCK_E`` kept entries of that row. Inputs fp32, bf16 or fp16; every
product and the sum over tokens in fp32.

Both operands are first copied tokens-last, in their own dtype ((F', T), the touched features only):
a (T, F) activation read one feature at a time would fetch a 32-byte sector per 2-byte element on a
GPU. Not measured on a GPU yet: ``benchmarks/gpu/run.sh`` times it against cuSPARSE and dense g^T x.
On CPU tensors the kernel runs only under ``TRITON_INTERPRET=1`` (slow; the tests use it).
"""

from __future__ import annotations

import weakref

import torch
import triton
import triton.language as tl

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCK_T = 64  # tokens per load: 128 contiguous bytes of a bf16 row
MIN_BLOCK_E, MAX_BLOCK_E = 16, 64  # kept entries of one lhs row per program (masked lanes cost no loads)
NUM_WARPS = 4

# Work items per (plan, block size): O(touched rows) int32/int64 tensors on the plan's device.
_ITEMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@triton.jit
def _sddmm_rows_kernel(lhs_ptr, rhs_ptr, crow_ptr, col_ptr, item_row_ptr, item_start_ptr, out_ptr, n_tokens,
                       stride_lf, stride_lt, stride_rf, stride_rt,
                       BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr):
    # One program: entries [start, min(start + BLOCK_E, crow[row + 1])) of CSR row ``row``.
    pid = tl.program_id(0)
    row = tl.load(item_row_ptr + pid).to(tl.int64)
    start = tl.load(item_start_ptr + pid).to(tl.int64)
    stop = tl.minimum(tl.load(crow_ptr + row + 1).to(tl.int64), start + BLOCK_E)
    entries = start + tl.arange(0, BLOCK_E)
    live = entries < stop
    cols = tl.load(col_ptr + entries, mask=live, other=0).to(tl.int64)  # (BLOCK_E,) rhs rows
    acc = tl.zeros((BLOCK_E,), dtype=tl.float32)
    for t0 in range(0, n_tokens, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
        in_range = t < n_tokens
        a = tl.load(lhs_ptr + row * stride_lf + t * stride_lt, mask=in_range, other=0.0)  # (BLOCK_T,)
        b = tl.load(rhs_ptr + cols[:, None] * stride_rf + t[None, :] * stride_rt,
                    mask=live[:, None] & in_range[None, :], other=0.0)  # (BLOCK_E, BLOCK_T)
        # Widen before multiplying: a bf16 x bf16 product is exact in fp32, and the sum stays fp32.
        acc += tl.sum(b.to(tl.float32) * a.to(tl.float32)[None, :], axis=1)
    tl.store(out_ptr + entries, acc, mask=live)


def block_entries(crow: torch.Tensor) -> int:
    """Entries per program: the longest CSR row rounded up to a power of two, within [MIN_BLOCK_E, MAX_BLOCK_E]."""
    longest = int((crow[1:] - crow[:-1]).max()) if crow.numel() > 1 else 1
    return min(MAX_BLOCK_E, max(MIN_BLOCK_E, triton.next_power_of_2(max(1, longest))))


def work_items(crow: torch.Tensor, block_e: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, first entry) of every program: each non-empty row split into pieces of ``block_e`` entries."""
    counts = (crow[1:] - crow[:-1]).to(torch.int64)  # (n_rows,)
    pieces = (counts + block_e - 1) // block_e
    rows = torch.repeat_interleave(torch.arange(counts.numel(), device=crow.device), pieces)  # (n_items,)
    first_piece = torch.cumsum(pieces, 0) - pieces  # item index of each row's first piece
    k = torch.arange(rows.numel(), device=crow.device) - first_piece[rows]
    starts = crow[:-1].to(torch.int64)[rows] + k * block_e
    return rows, starts


def _tokens_last(m2d: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
    """(T, F) -> (F', T) contiguous in the input's own dtype, F' = ``features`` only (None: all)."""
    if features is not None:
        m2d = m2d.index_select(1, features)
    return m2d.t().contiguous()


def sddmm_csr(lhs: torch.Tensor, lhs_features: torch.Tensor | None, rhs: torch.Tensor,
              rhs_features: torch.Tensor | None, crow: torch.Tensor, col: torch.Tensor,
              plan_key: object | None = None) -> torch.Tensor:
    """``out[e] = sum_t lhs[t, lhs_features[r]] * rhs[t, rhs_features[col[e]]]`` for entry e of CSR row r.

    The same contract as ``randmask.native.sddmm_csr``. Args:
        lhs, rhs: (T, F) activations, fp32/bf16/fp16, on one device (a CUDA GPU, or the CPU under
            ``TRITON_INTERPRET=1``).
        lhs_features, rhs_features: the feature ids the CSR rows / columns stand for (None: all).
        crow, col: the CSR structure, built by ``SparsePattern.plan()`` (trusted: not re-checked).
        plan_key: an object whose lifetime bounds the cached work items (the plan); None: no cache.

    Returns:
        (nnz,) float32, in CSR order.
    """
    if lhs.dtype not in SUPPORTED_DTYPES or rhs.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"the Triton SDDMM takes fp32/bf16/fp16 inputs, got {lhs.dtype} and {rhs.dtype}")
    if lhs.dim() != 2 or rhs.dim() != 2 or lhs.shape[0] != rhs.shape[0]:
        raise ValueError(f"sddmm_csr: lhs and rhs must be (T, F) matrices with the same T, got "
                         f"{tuple(lhs.shape)} and {tuple(rhs.shape)}")
    nnz, n_tokens = col.numel(), lhs.shape[0]
    out = torch.zeros(nnz, dtype=torch.float32, device=lhs.device)
    if nnz == 0 or n_tokens == 0:
        return out
    cached = _ITEMS.get(plan_key) if plan_key is not None else None
    if cached is None:
        block_e = block_entries(crow)
        cached = (block_e, *work_items(crow, block_e))
        if plan_key is not None:
            _ITEMS[plan_key] = cached
    block_e, rows, starts = cached
    lhs_t, rhs_t = _tokens_last(lhs, lhs_features), _tokens_last(rhs, rhs_features)  # (F', T) each
    _sddmm_rows_kernel[(rows.numel(),)](
        lhs_t, rhs_t, crow, col, rows, starts, out, n_tokens,
        lhs_t.stride(0), lhs_t.stride(1), rhs_t.stride(0), rhs_t.stride(1),
        BLOCK_E=block_e, BLOCK_T=BLOCK_T, num_warps=NUM_WARPS)
    return out


__all__ = ["BLOCK_T", "MAX_BLOCK_E", "MIN_BLOCK_E", "SUPPORTED_DTYPES", "block_entries", "sddmm_csr", "work_items"]
