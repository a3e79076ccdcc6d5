"""Mask samplers (a name -> function registry), per-matrix seeds, and budgets.

A sampler draws the kept entries of one (rows, cols) matrix in O(nnz) time and
memory and returns them as sorted, unique, flat row-major int64 indices. Samplers
always run on a CPU generator, so the same (seed, module name) gives the same
bytes on every process, device and reload.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable

import torch
from safetensors.torch import save as st_save

from randmask.config import MaskingError

MaskSampler = Callable[[tuple[int, int], float, torch.Generator], torch.Tensor]
"""(shape, keep probability p, CPU generator) -> sorted flat int64 indices."""

_SAMPLERS: dict[str, MaskSampler] = {}
BUILTIN_KINDS = ("random", "random_exact", "structured")
MASK_KIND_VERSIONS: dict[str, int] = {"random": 1, "random_exact": 1, "structured": 2}
"""Version of each built-in sampler's draws, bumped whenever the same (config, seed) starts drawing
other entries. Saved adapters record it, and the lab puts versions above 1 in a run's identity.
structured 2 (randmask 0.4.0): columns are allocated model-wide to meet the budget (some matrices
get none); version 1 kept at least one column per matrix, over budget below one column each."""


def register_mask_kind(name: str) -> Callable[[MaskSampler], MaskSampler]:
    """Decorator that adds a mask kind: ``@register_mask_kind("mine") def f(shape, p, gen): ...``.

    Adapters of non-built-in kinds store their indices explicitly in the file, so
    they load even where the sampler is not registered.
    """

    def decorator(fn: MaskSampler) -> MaskSampler:
        if name in _SAMPLERS or name == "custom":
            raise MaskingError(f"mask kind {name!r} already exists; pick another name.")
        _SAMPLERS[name] = fn
        return fn

    return decorator


def get_sampler(kind: str) -> MaskSampler:
    """The sampler registered under ``kind``; unknown kinds list the known ones."""
    try:
        return _SAMPLERS[kind]
    except KeyError:
        raise MaskingError(
            f"unknown mask_kind {kind!r}; known kinds: {sorted(_SAMPLERS)} (or 'custom' with explicit "
            "indices). Add one with randmask.register_mask_kind."
        ) from None


def mask_kinds() -> list[str]:
    """Names of all registered mask kinds."""
    return sorted(_SAMPLERS)


def derive_seed(seed: int, name: str) -> int:
    """A 63-bit seed from (global seed, module name), stable across processes and Python versions.

    Why not ``hash()``: it is salted per process. Why per name: same-shaped layers
    must get independent masks (PEFT SHiRA reuses one).
    """
    digest = hashlib.sha256(f"randmask:{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def make_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator seeded from (seed, name)."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(derive_seed(seed, name))
    return gen


def check_keep_probability(p: float) -> float:
    """``p`` as a float, MaskingError unless it is a real number in [0, 1] (the built-in samplers' domain)."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not (math.isfinite(p) and 0.0 <= p <= 1.0):
        raise MaskingError(f"keep probability p={p!r} must be a number in [0, 1] (the chance that an entry is kept).")
    return float(p)


@register_mask_kind("random")
def bernoulli_mask(shape: tuple[int, int], p: float, gen: torch.Generator) -> torch.Tensor:
    """I.i.d. Bernoulli(p) entries (the paper's mask), sampled as geometric gaps.

    The gaps between successive kept entries of a Bernoulli(p) sequence are i.i.d.
    Geometric(p) (support 1, 2, ...), so we draw about N*p gaps instead of N coins.
    """
    n, p = shape[0] * shape[1], check_keep_probability(p)
    if p >= 1.0:
        return torch.arange(n, dtype=torch.int64)
    if p == 0.0 or n == 0:
        return torch.empty(0, dtype=torch.int64)
    chunks: list[torch.Tensor] = []
    last = -1  # position of the last kept entry so far
    expected = n * p
    while True:
        # Draw a little more than the remaining expectation, so one round usually suffices.
        m = int((n - 1 - last) * p + 6.0 * (expected**0.5) + 16)
        gaps = torch.empty(m, dtype=torch.float64).geometric_(p, generator=gen)
        pos = last + torch.cumsum(gaps, 0)
        if pos[-1] >= n:
            # pos is strictly increasing: cut at the first position >= n (a boolean mask costs ~2x more).
            chunks.append(pos[: int(torch.searchsorted(pos, float(n)))])
            break
        chunks.append(pos)
        last = int(pos[-1].item())
    return (chunks[0] if len(chunks) == 1 else torch.cat(chunks)).to(torch.int64)


@register_mask_kind("random_exact")
def exact_count_mask(shape: tuple[int, int], p: float, gen: torch.Generator) -> torch.Tensor:
    """Exactly round(p*N) distinct entries, uniformly at random."""
    n = shape[0] * shape[1]
    k = round(check_keep_probability(p) * n)
    return _choose_distinct(n, k, gen)


@register_mask_kind("structured")
def column_mask(shape: tuple[int, int], p: float, gen: torch.Generator) -> torch.Tensor:
    """Whole input columns (the paper's Structured Masking): round(p*cols) columns, chosen uniformly.

    ``block_densities`` gives this sampler p = k/cols with k the block's column count from
    ``structured_column_counts``, so the model-wide total meets the budget; k may be 0.
    """
    rows, cols = shape
    chosen = torch.sort(_choose_distinct(cols, round(check_keep_probability(p) * cols), gen)).values
    # (rows, k) grid of flat indices r*cols + c, already in row-major order.
    return (torch.arange(rows, dtype=torch.int64)[:, None] * cols + chosen[None, :]).reshape(-1)


def structured_column_counts(shapes: list[tuple[int, int]], expected_entries: list[float],
                             gen: torch.Generator) -> list[int]:
    """Whole columns per matrix for structured masking, so that the model-wide total meets the budget.

    Matrix b should hold ``expected_entries[b]`` entries, i.e. c_b = entries / rows columns, which
    is fractional and often under one (SmolLM2-135M at 1e-5 of all parameters: 22 entries per q/v
    matrix, a column holds 192-576). Each matrix gets floor(c_b) columns plus one more with
    probability frac(c_b), the extras placed by systematic sampling over the matrices in a random
    order (one uniform offset): every matrix's expected count is exactly c_b, and the number of
    extras is sum(frac) rounded down or up, so the total is within one column of the budget. Matrices
    can get zero columns, as they must when the budget is under one column each.
    """
    if len(shapes) != len(expected_entries):
        raise MaskingError(f"{len(shapes)} matrix shapes but {len(expected_entries)} budgets were given.")
    wanted = [min(entries / rows, float(cols)) for (rows, cols), entries in zip(shapes, expected_entries)]
    counts = [int(c) for c in wanted]
    order = torch.randperm(len(shapes), generator=gen).tolist()
    offset = float(torch.rand((), generator=gen, dtype=torch.float64))
    # Systematic sampling: walking the matrices in random order, an extra column falls wherever the
    # running sum of fractional parts (started at the offset) crosses an integer.
    running = offset
    for b in order:
        before = int(running)
        running += wanted[b] - counts[b]
        counts[b] += int(running) - before
    return counts


def _choose_distinct(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """k distinct integers in [0, n), uniformly, sorted; O(k) unless k is a large fraction of n."""
    if k <= 0:
        return torch.empty(0, dtype=torch.int64)
    if k * 4 >= n:  # dense regime: the output is O(n) anyway
        return torch.sort(torch.randperm(n, generator=gen)[:k]).values
    picked = torch.empty(0, dtype=torch.int64)
    while picked.numel() < k:
        draw = torch.randint(0, n, (int((k - picked.numel()) * 1.1) + 8,), generator=gen)
        cand = torch.cat([picked, draw])
        # Keep first occurrences in draw order: sequential sampling without replacement.
        uniq, inverse = torch.unique(cand, return_inverse=True)
        first = torch.full((uniq.numel(),), cand.numel(), dtype=torch.int64)
        first.scatter_reduce_(0, inverse, torch.arange(cand.numel()), reduce="amin")
        picked = uniq[torch.argsort(first)]
    return torch.sort(picked[:k]).values


def partition_part(drawn: torch.Tensor, part: int, parts: int, gen: torch.Generator) -> torch.Tensor:
    """Part ``part`` of ``parts`` disjoint parts of the sorted indices ``drawn``: a random split into near-equal parts.

    Drawn at n times the density and split n ways, every entry lands in part k with about the
    un-partitioned probability, and no entry in two parts.
    """
    perm = torch.randperm(drawn.numel(), generator=gen)
    m = drawn.numel()
    return torch.sort(drawn[perm[part * m // parts:(part + 1) * m // parts]]).values


def tensor_sha256(tensor: torch.Tensor) -> str:
    """Hex SHA-256 of a tensor's raw little-endian bytes (dtype and values, not shape)."""
    flat = tensor.detach().to("cpu").reshape(-1).contiguous()
    # safetensors writes tensor data little-endian after an 8-byte header length and the JSON
    # header: slicing those off gives the raw bytes without needing numpy.
    blob = st_save({"t": flat})
    header_len = int.from_bytes(blob[:8], "little")
    return hashlib.sha256(blob[8 + header_len:]).hexdigest()


def indices_checksum(indices: torch.Tensor) -> str:
    """Hex SHA-256 (first 16 chars) of little-endian int64 flat indices."""
    return tensor_sha256(indices.detach().to(torch.int64))[:16]


def per_matrix_density(trainable_ratio: float, total_params: int, matrix_sizes: list[int]) -> list[float]:
    """Keep probability per matrix so that the expected total is ratio * total_params.

    The paper spreads the budget evenly: every targeted matrix gets the same
    expected count ratio * total / n_matrices.
    """
    per_matrix = trainable_ratio * total_params / len(matrix_sizes)
    if per_matrix < 1.0:
        raise MaskingError(
            f"trainable_ratio={trainable_ratio:g} of {total_params:,} parameters spread over "
            f"{len(matrix_sizes)} matrices is {per_matrix:.3g} entries per matrix, which leaves "
            f"matrices with zero trainable entries. Use trainable_ratio >= "
            f"{len(matrix_sizes) / total_params:.3g}, or fewer target modules."
        )
    too_big = [size for size in matrix_sizes if per_matrix > size]
    if too_big:
        raise MaskingError(
            f"trainable_ratio={trainable_ratio:g} asks for {per_matrix:,.0f} entries per matrix but the "
            f"smallest target has {min(too_big):,}. Lower trainable_ratio (at most "
            f"{min(matrix_sizes) * len(matrix_sizes) / total_params:.3g}) or target more modules."
        )
    return [per_matrix / size for size in matrix_sizes]


__all__ = [
    "BUILTIN_KINDS",
    "MASK_KIND_VERSIONS",
    "MaskSampler",
    "bernoulli_mask",
    "check_keep_probability",
    "column_mask",
    "structured_column_counts",
    "derive_seed",
    "exact_count_mask",
    "get_sampler",
    "indices_checksum",
    "make_generator",
    "partition_part",
    "mask_kinds",
    "per_matrix_density",
    "register_mask_kind",
    "tensor_sha256",
]
