"""No function in src/ is longer than 50 lines without a stated reason.

Length is ``end_lineno - lineno + 1`` of the ``def`` (docstring included, decorators not). A longer function
passes only when the line before its ``def`` (or before its first decorator), or a line from its ``def`` down to
its first body statement, carries a comment ``# Longer than 50 lines because <reason>``.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
LIMIT = 50
REASON = "# Longer than 50 lines because"


def _has_reason(lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """Whether the stated-reason comment (with a reason after it) stands where the module docstring says."""
    first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
    candidates = [first - 1, *range(node.lineno, node.body[0].lineno + 1)]  # 1-based line numbers
    for number in candidates:
        if 1 <= number <= len(lines):
            _, found, reason = lines[number - 1].partition(REASON)
            if found and reason.strip():
                return True
    return False


def long_functions(source: str, name: str = "<source>") -> list[str]:
    """``file:line name (N lines)`` for every function in ``source`` over the limit without a stated reason."""
    lines = source.splitlines()
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length > LIMIT and not _has_reason(lines, node):
                found.append(f"{name}:{node.lineno} {node.name} ({length} lines)")
    return found


def _function(lines: int, before: str = "", first: str = "") -> str:
    body = "\n".join(f"    x{i} = {i}" for i in range(lines - 1 - bool(first)))
    return f"{before}\ndef f():\n{first and '    ' + first + chr(10)}{body}\n"


def test_the_check_finds_a_long_function_and_honours_a_stated_reason():
    assert long_functions(_function(LIMIT)) == []
    assert long_functions(_function(LIMIT + 1)) == ["<source>:2 f (51 lines)"]
    assert long_functions(_function(LIMIT + 1, before=f"{REASON} it is a table.")) == []
    assert long_functions(_function(LIMIT + 1, first=f"{REASON} it is a table.")) == []
    assert long_functions(_function(LIMIT + 1, before=REASON)) != []  # a reason must follow
    assert long_functions(_function(LIMIT + 1, before="# Long on purpose.")) != []


def test_no_function_in_src_is_longer_than_50_lines_without_a_reason():
    files = sorted(SRC.rglob("*.py"))
    assert files, SRC
    found = [f for file in files for f in long_functions(file.read_text(), str(file.relative_to(SRC)))]
    assert not found, ("functions longer than 50 lines: split them, or state why above the def with "
                       f"'{REASON} ...':\n" + "\n".join(found))
