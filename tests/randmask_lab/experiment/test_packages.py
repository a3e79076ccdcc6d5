"""experiment/'s sub-packages are layered by job: each imports only the ones listed before it in ``LAYERS``, so a
job can be read (and changed) without the jobs that use it. The order is the one the package docstring and
docs/architecture.md give."""

from __future__ import annotations

from pathlib import Path

from tests.test_import_cycles import import_graph

import randmask_lab.experiment as experiment

PREFIX = "randmask_lab.experiment."
# Lowest first: a package may import those listed before it, never one listed after it.
LAYERS = ("compute", "results", "run", "parts", "training", "sweeps")


def _package(module: str) -> str | None:
    return module[len(PREFIX):].split(".")[0] if module.startswith(PREFIX) else None


def test_every_sub_package_has_a_layer_and_a_docstring():
    root = Path(experiment.__file__).parent
    found = {p.parent.name for p in root.glob("*/__init__.py")}
    assert found == set(LAYERS)
    assert not [p.name for p in root.glob("*.py") if p.name != "__init__.py"]  # every module sits in its job
    for name in LAYERS:
        assert (root / name / "__init__.py").read_text().startswith('"""')


def test_sub_packages_import_only_lower_layers():
    upward = []
    for module, targets in import_graph().items():
        here = _package(module)
        for target in targets:
            there = _package(target)
            if here and there and there != here and LAYERS.index(there) > LAYERS.index(here):
                upward.append(f"{module} -> {target}")
    assert upward == []


def test_sub_package_inits_are_only_docstrings():
    # Importing one module (say run.config) must not load its siblings: the __init__ files import nothing.
    graph = import_graph()
    assert {name: graph[PREFIX + name] for name in LAYERS} == {name: set() for name in LAYERS}
