"""The one target resolver: which modules (and fused column blocks) a method adapts.

Every method of randmask and of the lab (randmask, structured, LoRA, AdaLoRA, BitFit sites,
adapters) resolves its matrices here, so on every architecture they adapt the same ones.

A target spec is a list of items. An item is a module-name suffix matched on whole dotted
components (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``, not ``xq_proj``); ``*``
stands for one component (``"layer.*.output.dense"`` is BERT's MLP output, not
``attention.output.dense``); ``"c_attn[q,v]"`` restricts a fused projection to column blocks.
A string spec is a regex over whole module names, unless it is a plain name (letters, digits,
``_`` and ``.``), which is taken as the one-item list ``[name]``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

# The tables live in randmask.architectures; named again here (and in __all__), where the lab has always read them.
from randmask.architectures import ARCHITECTURES, TARGET_SETS, ArchitectureTargets, model_type_of
from randmask.config import MaskingError
from randmask.layer import is_maskable, logical_shape

_BLOCK_SPEC = re.compile(r"^(?P<name>[^\[\]]+)\[(?P<blocks>[a-z_,\s]+)\]$")
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_.]+$")

# Names of the q/k/v column blocks of known fused projections (in output order), so that
# targets=["q_proj", "v_proj"] on GPT-2 means c_attn's q and v blocks.
FUSED_BLOCKS: dict[str, list[str]] = {"c_attn": ["q", "k", "v"]}
QV_ALIASES: dict[str, str] = {"q_proj": "q", "v_proj": "v", "k_proj": "k", "query": "q", "value": "v",
                              "key": "k"}


@dataclass
class Target:
    """A module to adapt, and the logical row blocks of it that count as separate matrices."""

    name: str
    module: nn.Module  # the Linear/Conv1D (inside a MaskedLayer if the model is already masked)
    blocks: list[tuple[str, int, int]]  # (block name, first row, end row) of the (out, in) matrix

    def block_sizes(self) -> list[int]:
        """Entries of each block: (rows of the block) x (in features)."""
        in_f = logical_shape(self.module)[1]
        return [(stop - start) * in_f for _, start, stop in self.blocks]

    @property
    def whole(self) -> bool:
        """True when the target is the whole matrix (no fused-block restriction)."""
        return len(self.blocks) == 1 and self.blocks[0][1] == 0 and self.blocks[0][2] == logical_shape(self.module)[0]

    @property
    def label(self) -> str:
        """``name`` or ``name[q,v]`` for a block restriction."""
        return self.name if self.whole else f"{self.name}[{','.join(b[0] for b in self.blocks)}]"


def architecture_targets(model: nn.Module) -> ArchitectureTargets:
    """The table entry of ``model``'s architecture; a clear error naming the known ones if none."""
    model_type = model_type_of(model)
    if model_type not in ARCHITECTURES:
        raise MaskingError(
            f"no target table for model_type={model_type!r} (known: {', '.join(ARCHITECTURES)}); pass "
            f"targets=[...] with module-name suffixes. Adaptable modules in this model: {candidate_names(model)}"
        )
    return ARCHITECTURES[model_type]


def default_targets(model: nn.Module, which: str = "qv") -> list[str]:
    """The target spec of set ``which`` (one of ``TARGET_SETS``) for ``model``'s architecture."""
    if which not in TARGET_SETS:
        raise MaskingError(f"unknown target set {which!r}; known: {', '.join(TARGET_SETS)}.")
    table = architecture_targets(model)
    if which == "all_linear":
        return default_targets(model, "attention") + default_targets(model, "mlp")
    alternatives = getattr(table, which)
    for items in alternatives:
        if all(_match_names(model, item) for item in items):
            return list(items)
    raise MaskingError(
        f"none of the {which} target sets {[list(a) for a in alternatives]} of model_type="
        f"{model_type_of(model)!r} exists in this model; pass targets=[...]. Adaptable modules: "
        f"{candidate_names(model)}"
    )


def candidate_names(model: nn.Module, limit: int = 30) -> list[str]:
    """Distinct last name components of maskable modules, for error messages."""
    names = sorted({name.rsplit(".", 1)[-1] for name, m in _maskable_modules(model)})
    return names[:limit] + (["..."] if len(names) > limit else [])


def _unwrap(module: nn.Module) -> nn.Module:
    """The module a MaskedLayer or a PEFT tuner layer (both keep it as ``base_layer``) wraps."""
    inner = getattr(module, "base_layer", None)
    return inner if isinstance(inner, nn.Module) else module


def _never_called(model: nn.Module) -> set[str]:
    """Linear modules their parent reads by weight and never calls: ``nn.MultiheadAttention`` passes
    ``out_proj.weight`` to ``F.multi_head_attention_forward``, so a delta applied in its forward is never seen."""
    return {f"{name}.out_proj".lstrip(".") for name, module in model.named_modules()
            if isinstance(module, nn.MultiheadAttention)}


def _maskable_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    found, never_called = [], _never_called(model)
    for name, module in model.named_modules():
        if _inside_wrapper(name) or name in never_called:
            continue
        if is_maskable(_unwrap(module)):
            found.append((name, _unwrap(module)))
    return found


def _inside_wrapper(name: str) -> bool:
    # a MaskedLayer's (or a PEFT layer's) wrapped module is reached through the wrapper's name, and a
    # parametrization's modules (torch.nn.utils.parametrize: ``0.parametrizations.weight.0``) through its owner's
    return (name.endswith(".base_layer") or ".base_layer." in name or ".parametrizations." in f".{name}")


def _suffix_matches(name: str, suffix: str) -> bool:
    parts, want = name.split("."), suffix.split(".")
    if len(want) > len(parts):
        return False
    return all(w == "*" or w == p for w, p in zip(want, parts[-len(want):]))


def _match_names(model: nn.Module, item: str) -> list[str]:
    """Module names an item selects (block restriction stripped), wrappers' inner modules excluded."""
    match = _BLOCK_SPEC.match(item)
    suffix = match["name"] if match else item
    names = [n for n, _ in model.named_modules() if n and _suffix_matches(n, suffix) and not _inside_wrapper(n)]
    if not names and suffix in QV_ALIASES:
        names = [n for n, _ in _maskable_modules(model) if n.rsplit(".", 1)[-1] in FUSED_BLOCKS]
    return names


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


def _wanted_from_regex(model: nn.Module, spec: str) -> dict[str, list[str] | None]:
    try:
        regex = re.compile(spec)
    except re.error as e:
        raise MaskingError(f"targets={spec!r} is not a valid regular expression ({e}); pass a list of "
                           "module-name suffixes such as ['q_proj', 'v_proj'] instead.") from None
    return {n: None for n, _ in model.named_modules() if n and regex.fullmatch(n) and not _inside_wrapper(n)}


def _wanted_from_items(model: nn.Module, items: list[str]) -> dict[str, list[str] | None]:
    wanted: dict[str, list[str] | None] = {}
    for item in items:
        if not isinstance(item, str) or not item:
            raise MaskingError(f"target {item!r} must be a non-empty module-name suffix string.")
        match = _BLOCK_SPEC.match(item)
        suffix = match["name"] if match else item
        blocks = [b.strip() for b in match["blocks"].split(",")] if match else None
        names = _match_names(model, item)
        if names and suffix in QV_ALIASES and not any(_suffix_matches(n, suffix) for n in names):
            blocks = [QV_ALIASES[suffix]]  # q_proj/v_proj on a fused c_attn (GPT-2): that block of it
        if not names:
            # regex syntax, an empty name component ('.*', '.q_proj') or a '*' inside one, which no suffix has
            regex_like = any(c in suffix for c in "^$+?()[]{}|\\") or any(
                not part or ("*" in part and part != "*") for part in suffix.split("."))
            hint = (" A list item is a module-name suffix ('*' stands for one name component), never a regex: pass "
                    "a regex as the whole targets string instead (targets='.*q_proj')." if regex_like else
                    " Use module-name suffixes, or a regex over whole names as the whole targets string.")
            raise MaskingError(f"target {item!r} matches no module. Adaptable modules in this model: "
                               f"{candidate_names(model)}.{hint}")
        for n in names:
            previous = wanted.get(n, [])
            wanted[n] = None if blocks is None or previous is None else sorted(set(previous) | set(blocks))
    return wanted


ALL_LINEAR = "all-linear"  # PEFT's shorthand (peft.utils.constants.INCLUDE_LINEAR_LAYERS_SHORTHAND)
CLASSIFIER_HEADS = ("score", "classifier")  # PEFT's SEQ_CLS_HEAD_NAMES: a classification model's head


def all_linear_names(model: nn.Module) -> list[str]:
    """PEFT's ``target_modules="all-linear"``: every Linear / Conv1D module but the output layer (the output
    embeddings; a classification model's ``score`` / ``classifier`` head where it has none), on any architecture."""
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    heads = [output] if output is not None else [getattr(model, name, None) for name in CLASSIFIER_HEADS]
    head_ids = {id(_unwrap(h)) for h in heads if isinstance(h, nn.Module)}
    return [name for name, module in _maskable_modules(model) if id(module) not in head_ids]


def resolve_targets(model: nn.Module, targets: list[str] | str | None = None,
                    exclude: list[str] | str | None = None) -> list[Target]:
    """The modules (and blocks) a target spec selects in ``model``, less those ``exclude`` names, in module order.

    ``None`` is the architecture's q/v default. Clear errors if nothing matches, if ``exclude`` leaves nothing or
    names a module the model does not have, or if a match is not a ``nn.Linear`` / transformers ``Conv1D``.
    """
    if targets is None:
        targets = default_targets(model)
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        targets = all_linear_names(model)  # whole names: each matches itself only
    if isinstance(targets, str) and _PLAIN_NAME.match(targets):
        targets = [targets]  # "q_proj" means the suffix, not a regex that must match a whole name
    if isinstance(targets, str):
        wanted = _wanted_from_regex(model, targets)
    elif isinstance(targets, (list, tuple)):
        if not targets:
            raise MaskingError("targets is an empty list: name at least one module, or pass None.")
        wanted = _wanted_from_items(model, list(targets))
    else:
        raise MaskingError(f"targets={targets!r} must be a list of module-name suffixes or a regex string.")
    if not wanted:
        raise MaskingError(
            f"targets {targets!r} match no module. Adaptable modules in this model: {candidate_names(model)}."
        )
    if exclude:
        wanted = _without_excluded(model, wanted, targets, exclude)
    resolved, never_called = [], _never_called(model)
    for name, module in model.named_modules():
        if name not in wanted:
            continue
        if name in never_called:
            raise MaskingError(f"target {name!r} is the out_proj of a torch.nn.MultiheadAttention, which reads its "
                               "weight directly and never calls it, so randmask's delta would be ignored. Drop it "
                               "from the targets.")
        inner = _unwrap(module)
        if not is_maskable(inner):
            raise MaskingError(
                f"target {name!r} is a {type(inner).__name__}; randmask adapts torch.nn.Linear and "
                f"transformers Conv1D weights only. Adaptable modules: {candidate_names(model)}."
            )
        resolved.append(Target(name, inner, _split_blocks(name, inner, wanted[name])))
    return resolved


def _without_excluded(model: nn.Module, wanted: dict[str, list[str] | None], targets: list[str] | str,
                      exclude: list[str] | str) -> dict[str, list[str] | None]:
    """``wanted`` less the modules ``exclude`` names; refused when it excludes none of them, or all."""
    excluded = excluded_names(model, exclude)
    if not excluded & set(wanted):
        some = sorted(excluded)
        first = f"{some[0]}{', ...' * (len(some) > 1)}"
        raise MaskingError(f"exclude {exclude!r} matches modules of this model ({first}) but none of the "
                           f"{len(wanted)} that targets {targets!r} select, so it would exclude nothing: exclude "
                           "matches whole module names, as PEFT's exclude_modules does, and a parent module does "
                           "not exclude the modules inside it. Name the target modules themselves (e.g. "
                           f"{sorted(wanted)[0]!r}) or a regex over their names.")
    if not set(wanted) - excluded:
        raise MaskingError(f"exclude {exclude!r} leaves none of the {len(wanted)} modules that targets "
                           f"{targets!r} select; narrow exclude or widen targets.")
    return {name: blocks for name, blocks in wanted.items() if name not in excluded}


def excluded_names(model: nn.Module, exclude: list[str] | str) -> set[str]:
    """The module names ``exclude`` selects, matched as targets are (a plain name is a suffix, any other string a regex
    over whole names); each list item must select a module of ``model``: a typo would otherwise exclude nothing."""
    if isinstance(exclude, str) and not _PLAIN_NAME.match(exclude):
        try:
            regex = re.compile(exclude)
        except re.error as e:
            raise MaskingError(f"exclude={exclude!r} is not a valid regular expression ({e}); pass a list of "
                               "module-name suffixes instead.") from None
        names = {n for n, _ in model.named_modules() if n and regex.fullmatch(n) and not _inside_wrapper(n)}
        if not names:
            raise MaskingError(f"exclude={exclude!r} matches no module of this model, so it would exclude nothing; "
                               f"check the regex (it must match whole names). Adaptable modules: "
                               f"{candidate_names(model)}.")
        return names
    names = set()
    for item in [exclude] if isinstance(exclude, str) else exclude:
        if _BLOCK_SPEC.match(item):
            raise MaskingError(f"exclude item {item!r} names column blocks; exclude whole modules, and restrict a "
                               "fused projection's blocks in targets instead (e.g. 'c_attn[q,v]').")
        found = [n for n, _ in model.named_modules() if n and _suffix_matches(n, item) and not _inside_wrapper(n)]
        if not found:
            raise MaskingError(f"exclude item {item!r} matches no module of this model, so it would exclude nothing; "
                               f"check the name. Adaptable modules: {candidate_names(model)}.")
        names.update(found)
    return names


def weight_ties(model: nn.Module, targets: list[Target]) -> dict[str, tuple[str, ...]]:
    """For each target whose weight is also another module's (tied: ``tie_word_embeddings`` makes ``lm_head``'s
    weight the input embedding's), the other modules that hold it. Ties are the same ``Parameter`` under two names."""
    names_of: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
    ties = {}
    for target in targets:
        own = f"{target.name}."
        others = tuple(name.rpartition(".")[0] or name for name in names_of.get(id(target.module.weight), ())
                       if not name.startswith(own))
        if others:
            ties[target.name] = others
    return ties


__all__ = [
    "ALL_LINEAR",
    "ARCHITECTURES",
    "FUSED_BLOCKS",
    "QV_ALIASES",
    "TARGET_SETS",
    "ArchitectureTargets",
    "Target",
    "all_linear_names",
    "architecture_targets",
    "candidate_names",
    "default_targets",
    "excluded_names",
    "model_type_of",
    "resolve_targets",
    "weight_ties",
]
