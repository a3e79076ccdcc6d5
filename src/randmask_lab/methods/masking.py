"""Random and structured masking: the core library (`randmask.apply_masking`) behind the
method interface. `ratio` is a fraction of *all* base-model parameters (the paper's budget),
`density` a fraction of each targeted matrix; exactly one is required. Default targets are the
library's (`randmask.default_targets`): q/v projections, and on GPT-2 only the q and v
column blocks of the fused `c_attn`. Masked weights are synced inside the layers' forward,
so no per-step hook is needed."""

from __future__ import annotations

from torch import nn

from randmask import MaskingConfig, apply_masking, masked_layers, masking_summary, save_adapter
from randmask_lab.methods.common import unfreeze_heads
from randmask_lab.methods.prepared import PreparedModel, build_report


def prepare_masking(
    model: nn.Module,
    *,
    kind: str,
    total: int,
    heads: list[str],
    targets: list[str] | None,
    ratio: float | None,
    density: float | None,
    seed: int = 0,
    partition: str | None = None,
) -> PreparedModel:
    """Mask the `targets` matrices of `model` with mask kind `kind` ("random"/"structured").

    partition: "k/n" draws part k of n disjoint parts of one mask (``MaskingConfig.partition``):
    adapters trained with the same seed and n and different k never share an entry.
    """
    if (ratio is None) == (density is None):
        raise ValueError(
            f"{'randmask' if kind == 'random' else 'structured'} needs exactly one of ratio= (fraction "
            f"of all model parameters, e.g. 1e-3) or density= (fraction of each matrix); got "
            f"ratio={ratio}, density={density}"
        )
    config = MaskingConfig(
        targets=targets, trainable_ratio=ratio, density=density, mask_kind=kind, seed=seed,
        partition=_parse_partition(partition),
    )
    masked = apply_masking(model, config)
    unfreeze_heads(masked, heads)
    name = "randmask" if kind == "random" else "structured"
    budget = f"ratio={ratio}" if ratio is not None else f"density={density}"
    if partition is not None:
        budget += f", part {partition} of a disjoint partition"
    summary = masking_summary(masked)
    matrices = [m.name.rsplit(".", 1)[-1] for m in summary.matrices]
    notes = [
        f"{kind} mask, {budget}, seed={seed}: {summary.trainable:,} entries in {len(matrices)} "
        f"matrices ({', '.join(sorted(set(matrices)))})"
    ]
    report = build_report(name, masked, total, heads, label=lambda _: "values", notes=notes)
    return PreparedModel(masked, report, adapted=_adapted_labels(masked),
                         save_native=lambda folder: save_adapter(masked, folder))


def _parse_partition(text: str | None) -> tuple[int, int] | None:
    """ "k/n" -> (k, n); a clear error for anything else."""
    if text is None:
        return None
    k, sep, n = str(text).partition("/")
    if not (sep and k.strip().isdigit() and n.strip().isdigit()):
        raise ValueError(f"option partition={text!r} must be k/n, e.g. partition=0/4 (part 0 of 4 disjoint masks)")
    return int(k), int(n)


def _adapted_labels(model: nn.Module) -> list[str]:
    """``name``, or ``name[q,v]`` where only blocks of a fused projection are masked."""
    labels = []
    for name, layer in masked_layers(model).items():
        blocks = [b.name for b in layer.adapters["default"].blocks]
        labels.append(name if blocks == [""] else f"{name}[{','.join(blocks)}]")
    return labels
