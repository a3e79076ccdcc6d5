"""The README's code: every python block compiles and its imports run; the library example runs as written."""

from __future__ import annotations

import ast
import copy
import re
from pathlib import Path

import pytest
import torch
from torch import nn

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), re.M | re.S)


def imports_of(code: str) -> str:
    """The block's top-level import statements, as source."""
    tree = ast.parse(code)
    return "\n".join(ast.unparse(node) for node in tree.body if isinstance(node, ast.Import | ast.ImportFrom))


def test_the_readme_has_the_library_and_peft_examples() -> None:
    blocks = python_blocks()
    assert any("from randmask import" in b for b in blocks) and any("import randmask.peft" in b for b in blocks)


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_each_block_compiles_and_its_imports_run(index: int) -> None:
    code = python_blocks()[index]
    if "peft" in imports_of(code):
        pytest.importorskip("peft")
    exec(compile(imports_of(code), f"README block {index}", "exec"), {})


class QV(nn.Module):
    """Enough parameters (2.1M) that the README's 0.001% budget keeps entries in both matrices."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.v_proj = nn.Linear(1024, 1024), nn.Linear(1024, 1024)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.v_proj(self.q_proj(x))


def test_the_library_example_runs_as_written(tmp_path, monkeypatch) -> None:
    (code,) = [b for b in python_blocks() if "from randmask import" in b]
    torch.manual_seed(0)
    base_model = QV()
    pristine = copy.deepcopy(base_model)
    scope = {"model": copy.deepcopy(base_model), "base_model": base_model}
    monkeypatch.chdir(tmp_path)  # the example saves to "out/"
    exec(compile(code, "README library example", "exec"), scope)
    x = torch.randn(3, 1024)
    with torch.no_grad():  # untrained values are zero: merged, the model is the pretrained one, bit for bit
        assert torch.equal(scope["plain"](x), pristine(x))
    assert (tmp_path / "out" / "adapter_config.json").is_file() and not any(
        "Masked" in type(m).__name__ for m in scope["plain"].modules())
