"""The budget spread over the targets, and each target's mask drawn from it.

``apply_masking``, ``load_adapter``, PEFT's ``RandMaskModel`` and the SHiRA import all call these two functions, so
the keep probabilities (hence the regenerated masks) are identical wherever a mask is drawn again.
"""

from __future__ import annotations

import torch

from randmask.adapter import Block
from randmask.config import MaskingConfig, MaskingError
from randmask.layer import is_conv1d, logical_shape
from randmask.masks import get_sampler, make_generator, partition_part, per_matrix_density, structured_column_counts
from randmask.targets import Target


def block_densities(config: MaskingConfig, total_params: int, targets: list[Target]) -> list[list[float]]:
    """Keep probability of every block of every target: the one place the budget is computed.

    ``apply_masking`` and ``load_adapter`` both call it, so the floats (and hence the
    regenerated masks) are identical. Custom masks have no budget: every p is 1.0 (unused).
    Structured masks keep whole columns: their p is (columns allotted to the block) / in_features,
    allotted model-wide by ``structured_column_counts`` (0.0 for a block that gets none).
    """
    sizes = [size for t in targets for size in t.block_sizes()]
    if config.trainable_ratio is not None:
        flat = per_matrix_density(config.trainable_ratio, total_params, sizes)
    else:
        flat = [config.density or 1.0] * len(sizes)
    if config.mask_kind == "structured":
        flat = _structured_densities(config, targets, flat)
    out, k = [], 0
    for target in targets:
        out.append(flat[k:k + len(target.blocks)])
        k += len(target.blocks)
    return out


def _structured_densities(config: MaskingConfig, targets: list[Target], flat: list[float]) -> list[float]:
    shapes = [(stop - start, logical_shape(t.module)[1]) for t in targets for _, start, stop in t.blocks]
    entries = [p * rows * cols for p, (rows, cols) in zip(flat, shapes)]
    # One generator for the allocation, apart from the per-matrix column draws.
    counts = structured_column_counts(shapes, entries, make_generator(config.seed, "structured:column-allocation"))
    if not any(counts):
        raise MaskingError(
            f"structured masking at this budget ({sum(entries):,.0f} entries) kept no whole column: one column "
            f"holds {min(r for r, _ in shapes):,}-{max(r for r, _ in shapes):,} entries. "
            "Raise trainable_ratio/density, or use mask_kind='random'."
        )
    return [k / cols for k, (_, cols) in zip(counts, shapes)]


def draw_mask(target: Target, densities: list[float], config: MaskingConfig,
              custom: torch.Tensor | None = None) -> tuple[torch.Tensor, list[Block]]:
    """Sorted flat stored-weight indices of one target's mask, and its per-block counts.

    Drawn from (config.seed, module name[block]) with ``config.mask_kind``'s sampler, or taken
    from ``custom`` (a bool (out, in) mask or flat logical row-major indices).
    """
    out_f, in_f = logical_shape(target.module)
    transposed = is_conv1d(target.module)
    pieces, blocks = [], []
    for (block_name, start, stop), p in zip(target.blocks, densities):
        key = f"{target.name}[{block_name}]" if block_name else target.name
        if custom is not None:
            local = _custom_block_indices(custom, target.name, (out_f, in_f), start, stop)
        else:
            local = _draw_block(config, (stop - start, in_f), p, key)
        if local.numel() == 0 and p != 0.0:  # p == 0: a structured block allotted no column
            raise MaskingError(
                f"the mask of {key} ({stop - start}x{in_f}, keep probability {p:.3g}, expected "
                f"{p * (stop - start) * in_f:.3g} entries) drew zero entries. Raise the budget "
                "(trainable_ratio or density), or use mask_kind='random_exact'."
            )
        rows = torch.div(local, in_f, rounding_mode="floor") + start
        cols = local % in_f
        pieces.append(cols * out_f + rows if transposed else rows * in_f + cols)
        blocks.append(Block(block_name, start, stop, int(local.numel())))
    return torch.sort(torch.cat(pieces)).values, blocks


def _draw_block(config: MaskingConfig, shape: tuple[int, int], p: float, key: str) -> torch.Tensor:
    """One block's sorted local indices from the config's sampler (and its part, with ``partition``)."""
    sampler = get_sampler(config.mask_kind)
    if config.partition is None:
        return sampler(shape, p, make_generator(config.seed, key))
    part, parts = config.partition
    if p * parts > 1.0:
        raise MaskingError(f"partition={config.partition}: {parts} disjoint parts at keep probability {p:.3g} need "
                           f"{p * parts:.3g} of {key}, more than all of it. Lower the budget or the number of parts.")
    drawn = sampler(shape, p * parts, make_generator(config.seed, key))
    return partition_part(drawn, part, parts, make_generator(config.seed, f"{key}:partition"))


def _custom_block_indices(mask: torch.Tensor, name: str, shape: tuple[int, int], start: int,
                          stop: int) -> torch.Tensor:
    """Row-major indices of a user mask (bool (out, in) tensor or flat logical indices) in a block."""
    if mask.dtype == torch.bool:
        if tuple(mask.shape) != shape:
            raise MaskingError(f"custom mask for {name} has shape {tuple(mask.shape)}; expected (out, in) "
                               f"= {shape}.")
        flat = mask.reshape(-1).nonzero().reshape(-1)
    else:
        if mask.is_floating_point() or mask.is_complex():
            raise MaskingError(f"custom mask indices for {name} are {mask.dtype}; pass integer indices "
                               "(or a bool mask), so that no index is silently truncated.")
        flat = mask.reshape(-1).to(torch.int64)
        if torch.unique(flat).numel() != flat.numel():
            raise MaskingError(f"custom mask indices for {name} hold duplicates; each entry may be kept once.")
        flat = torch.sort(flat).values
        if flat.numel() and (flat[0] < 0 or flat[-1] >= shape[0] * shape[1]):
            raise MaskingError(f"custom mask indices for {name} fall outside the {shape} matrix "
                               f"(valid: 0 .. {shape[0] * shape[1] - 1}).")
    rows = torch.div(flat, shape[1], rounding_mode="floor")
    keep = (rows >= start) & (rows < stop)
    return flat[keep] - start * shape[1]


__all__ = ["block_densities", "draw_mask"]
