"""The library stands alone and every module talks to others through public names only."""

import ast
import subprocess
import sys
from pathlib import Path

import randmask

SRC = Path(__file__).resolve().parents[1] / "src"
LIBRARY_SUBMODULES_WITH_PUBLIC_ALL = ("randmask.ops", "randmask.masks", "randmask.targets")


def _imports(package: str):
    """(file, imported module, imported name) of every ``from X import name`` under src/package."""
    for path in sorted((SRC / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    yield path.relative_to(SRC), node.module, alias.name


def test_import_randmask_loads_only_torch_and_safetensors() -> None:
    code = ("import sys, torch, safetensors.torch; before = set(sys.modules); import randmask; "
            "print(sorted(m for m in set(sys.modules) - before if not m.startswith('randmask.') and m != 'randmask'))")
    new = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert new == "[]"
    code = ("import randmask, sys; print(sorted(m for m in ('transformers', 'peft', 'matplotlib', 'datasets', "
            "'randmask_lab') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


def test_no_private_names_cross_modules() -> None:
    offenders = [f"{f}: from {m} import {n}" for pkg in ("randmask", "randmask_lab") for f, m, n in _imports(pkg)
                 if m.split(".")[0] in ("randmask", "randmask_lab") and n.startswith("_") and n != "__version__"]
    assert offenders == []


def test_the_lab_uses_the_library_through_public_names() -> None:
    import importlib

    offenders = []
    for f, module, name in _imports("randmask_lab"):
        if module == "randmask":
            ok = name in randmask.__all__
        elif module.startswith("randmask."):
            ok = module in LIBRARY_SUBMODULES_WITH_PUBLIC_ALL and name in importlib.import_module(module).__all__
        else:
            continue
        if not ok:
            offenders.append(f"{f}: from {module} import {name}")
    assert offenders == []


def test_the_library_never_imports_the_lab() -> None:
    assert [f"{f}: {m}" for f, m, _ in _imports("randmask") if m.startswith("randmask_lab")] == []
    for path in (SRC / "randmask").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("randmask_lab") for a in node.names), path


def test_experiment_does_not_import_analysis() -> None:
    """The lab's dependency on analysis flows one way: analysis builds on the runner, not back."""
    offenders = [f"{f}: {m}" for f, m, _ in _imports("randmask_lab")
                 if str(f).startswith(("randmask_lab/experiment", "randmask_lab/methods", "randmask_lab/tasks"))
                 and m.startswith("randmask_lab.analysis")]
    assert offenders == []
