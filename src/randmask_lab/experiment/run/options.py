"""Typed dataclass -> argparse options, litgpt style: each field's docstring is its --help text."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from functools import cache
from typing import Any, Literal, Union, get_args, get_origin

FLAGS = "flags"
"""Field metadata: the field's further option names (``--ratio`` beside ``--trainable-ratio``)."""
SET_BY_RUNNER = "set_by_runner"
"""Field metadata: the runner fills the field in (what was asked for, beside what ran); it gets no option, so a
record cannot be made to claim another request."""


@cache
def field_docs(cls: type) -> dict[str, str]:
    """{field name: the string literal that follows its annotated assignment in the class body}."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _key_value(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value  # a bare word: keep it as a string


def _option_kwargs(tp: Any) -> dict[str, Any]:
    tp, _ = _strip_optional(tp)
    origin = get_origin(tp)
    if tp is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin is Literal:
        choices = list(get_args(tp))
        return {"choices": choices, "type": type(choices[0])}
    if origin is list:
        (item,) = get_args(tp)
        return {"nargs": "+", "type": item}
    if origin is tuple:
        items = get_args(tp)
        return {"nargs": len(items), "type": items[0]}
    if origin is dict:
        return {"action": "append", "type": _key_value, "metavar": "KEY=VALUE"}
    return {"type": tp}


def add_dataclass_options(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = (),
                          defaults: dict[str, Any] | None = None) -> None:
    """Add one ``--field-name`` option per field of dataclass ``cls`` (except ``skip``)."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    defaults = defaults or {}
    for f in dataclasses.fields(cls):
        if f.name in skip or f.metadata.get(SET_BY_RUNNER):
            continue
        default = defaults.get(f.name, f.default if f.default is not dataclasses.MISSING else f.default_factory())
        help_text = docs.get(f.name, "").replace("%", "%%")
        if default is not None and default != {} and get_origin(_strip_optional(hints[f.name])[0]) is not dict:
            help_text += f" (default: {default})"
        kwargs = _option_kwargs(hints[f.name])
        name = "--" + f.name.replace("_", "-")
        if get_origin(_strip_optional(hints[f.name])[0]) is dict:
            name = "--option" if f.name == "method_options" else name
        parser.add_argument(name, *f.metadata.get(FLAGS, ()), dest=f.name, default=defaults.get(f.name), help=help_text,
                            **kwargs)


def dataclass_from_args(cls: type, args: argparse.Namespace, **overrides: Any) -> Any:
    """Build ``cls`` from parsed options: unset options keep the dataclass defaults."""
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name, None)
        if value is None:
            continue
        if isinstance(value, list) and value and isinstance(value[0], tuple) and len(value[0]) == 2:
            value = dict(value)  # --option KEY=VALUE pairs
        kwargs[f.name] = tuple(value) if isinstance(f.default, tuple) else value
    kwargs.update(overrides)
    return cls(**kwargs)
