"""Find the modules (and fused column blocks) a MaskingConfig targets."""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from randmask.config import DEFAULT_TARGETS, FUSED_BLOCKS, QV_ALIASES, MaskingConfig, MaskingError
from randmask.layer import MaskedLayer, is_maskable, logical_shape

_BLOCK_SPEC = re.compile(r"^(?P<name>[^\[\]]+)\[(?P<blocks>[a-z_,\s]+)\]$")


@dataclass
class Target:
    """A module to mask, and the logical row blocks of it that count as separate matrices."""

    name: str
    module: nn.Module  # the Linear/Conv1D (inside a MaskedLayer if the model is already masked)
    blocks: list[tuple[str, int, int]]  # (block name, first row, end row) of the (out, in) matrix

    def block_sizes(self) -> list[int]:
        in_f = logical_shape(self.module)[1]
        return [(stop - start) * in_f for _, start, stop in self.blocks]


def default_targets(model: nn.Module) -> list[str]:
    """The architecture's attention query/value projections, from ``model.config.model_type``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGETS:
        spec = DEFAULT_TARGETS[model_type]
        alternatives = " ".join(spec).split(" | ")
        suffixes = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        for alternative in alternatives:
            names = alternative.split()
            if all(_BLOCK_SPEC.sub(r"\g<name>", n) in suffixes for n in names):
                return names
        return alternatives[0].split()
    raise MaskingError(
        f"no default targets for model_type={model_type!r}; pass MaskingConfig(targets=[...]) with "
        f"module-name suffixes. Maskable modules in this model: {candidate_names(model)}"
    )


def candidate_names(model: nn.Module, limit: int = 30) -> list[str]:
    """Distinct last name components of maskable modules, for error messages."""
    names = sorted({name.rsplit(".", 1)[-1] for name, m in _maskable_modules(model)})
    return names[:limit] + (["..."] if len(names) > limit else [])


def _maskable_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    found = []
    for name, module in model.named_modules():
        if isinstance(module, MaskedLayer):
            found.append((name, module.base_layer))
        elif is_maskable(module) and not name.endswith(".base_layer"):
            found.append((name, module))
    return found


def _split_blocks(name: str, module: nn.Module, wanted: list[str] | None) -> list[tuple[str, int, int]]:
    out_f = logical_shape(module)[0]
    if wanted is None:
        return [("", 0, out_f)]
    kind = name.rsplit(".", 1)[-1]
    layout = FUSED_BLOCKS.get(kind)
    if layout is None:
        raise MaskingError(
            f"column blocks {wanted} were asked of {name!r}, but only fused projections "
            f"{sorted(FUSED_BLOCKS)} have known blocks. Target the whole module instead."
        )
    unknown = [b for b in wanted if b not in layout]
    if unknown or out_f % len(layout):
        raise MaskingError(f"blocks {unknown or wanted} of {name!r}: known blocks are {layout}.")
    width = out_f // len(layout)
    return [(b, layout.index(b) * width, (layout.index(b) + 1) * width) for b in layout if b in wanted]


def resolve_targets(model: nn.Module, config: MaskingConfig) -> list[Target]:
    """The targets of ``config`` in ``model``, in module order; clear errors if none or wrong type."""
    spec = config.targets if config.targets is not None else default_targets(model)
    all_modules = dict(model.named_modules())
    maskable = _maskable_modules(model)

    if isinstance(spec, str):  # a regex over whole module names
        regex = re.compile(spec)
        names = [n for n, _ in all_modules.items() if n and regex.fullmatch(n)]
        names = [n for n in names if not n.endswith(".base_layer")]
        wanted: dict[str, list[str] | None] = {n: None for n in names}
    else:
        wanted = {}
        for item in spec:
            match = _BLOCK_SPEC.match(item)
            suffix = match["name"] if match else item
            blocks = [b.strip() for b in match["blocks"].split(",")] if match else None
            names = [n for n in all_modules if n == suffix or n.endswith("." + suffix)]
            names = [n for n in names if not n.endswith(".base_layer")]
            if not names and suffix in QV_ALIASES:
                # q_proj/v_proj on a model with a fused c_attn (GPT-2): mask that block of it.
                fused = [n for n, _ in maskable if n.rsplit(".", 1)[-1] in FUSED_BLOCKS]
                names, blocks = fused, [QV_ALIASES[suffix]]
            if not names:
                raise MaskingError(
                    f"target {item!r} matches no module. Maskable modules in this model: "
                    f"{candidate_names(model)}. Use module-name suffixes or a regex string."
                )
            for n in names:
                previous = wanted.get(n, [])
                wanted[n] = None if blocks is None or previous is None else sorted(set(previous) | set(blocks))
    if not wanted:
        raise MaskingError(
            f"targets {spec!r} match no module. Maskable modules in this model: {candidate_names(model)}."
        )

    targets = []
    for name, module in all_modules.items():
        if name not in wanted:
            continue
        inner = module.base_layer if isinstance(module, MaskedLayer) else module
        if not is_maskable(inner):
            raise MaskingError(
                f"target {name!r} is a {type(inner).__name__}; randmask masks torch.nn.Linear and "
                f"transformers Conv1D weights only. Maskable modules: {candidate_names(model)}."
            )
        targets.append(Target(name, inner, _split_blocks(name, inner, wanted[name])))
    return targets
