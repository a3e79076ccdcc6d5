"""How far a run's configuration travels from ``run_training`` to the training loop (a count, not a timing).

    PYTHONPATH=src python benchmarks/config_path.py [--json FILE] [--show]

Runs one tiny randmask run (a 2-layer Llama built on the fly, RTE from the data root) under ``sys.setprofile``
and records every call, from ``run_training`` until ``Trainer.train`` starts, of a function in ``src/`` that
receives the run's ``RunConfig`` (as an argument, as ``self``, or inside an object's ``.config``); with
``--values``, also every call that receives one of its field values (the same object: the ratio, the model
name) after it left the config. Printed:

- stops: such calls;
- modules: the distinct modules they are in;
- returns: how often the path comes back to a module it had already left (A -> B -> A counts one).

Issue 27 asked for the second number to halve; this script measures it on any checkout the same way.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"


def _module_of(filename: str) -> str | None:
    """``randmask_lab.experiment.training.train`` for a file under src/, else None."""
    try:
        rel = Path(filename).resolve().relative_to(SRC)
    except ValueError:
        return None
    return ".".join(rel.with_suffix("").parts).removesuffix(".__init__")


def _carries(value: Any, config_type: type) -> bool:
    """``value`` is a RunConfig, or holds one as ``.config`` (a Trainer, the assembled ``RunParts``)."""
    return isinstance(value, config_type) or isinstance(getattr(value, "config", None), config_type)


def trace(config: Any, values: bool = False) -> list[tuple[str, str]]:
    """(module, function) of every call that receives a ``RunConfig`` (``values``: or one of ``config``'s own
    field values, the same object: its ratio, model name, targets...), up to the loop's ``Trainer.train``."""
    from randmask_lab.experiment import RunConfig, run_training

    # Field values followed by identity; None, bools and ints are shared objects in Python, so they are left out.
    followed = {id(v) for v in vars(config).values() if v is not None and not isinstance(v, (bool, int))}

    stops: list[tuple[str, str]] = []

    class Reached(Exception):
        pass

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event != "call":
            return
        module = _module_of(frame.f_code.co_filename)
        if module is None:
            return
        if module.endswith("loop") and frame.f_code.co_name == "train":
            raise Reached
        code = frame.f_code
        n_args = code.co_argcount + code.co_kwonlyargcount + bool(code.co_flags & 0x04) + bool(code.co_flags & 0x08)
        received = [frame.f_locals.get(name) for name in code.co_varnames[:n_args]]
        if any(_carries(v, RunConfig) or (values and id(v) in followed) for v in received):
            stops.append((module, code.co_qualname))

    sys.setprofile(profile)
    try:
        run_training(config)
    except Reached:
        pass
    finally:
        sys.setprofile(None)
    return stops


def summary(stops: list[tuple[str, str]]) -> dict[str, Any]:
    """stops, modules, returns (see the module docstring) and the per-module visit counts."""
    path = [m for m, _ in stops]
    runs = [m for i, m in enumerate(path) if i == 0 or path[i - 1] != m]  # consecutive stops in one module: one visit
    returns = sum(1 for i, m in enumerate(runs) if m in runs[:i])
    visits = {m: runs.count(m) for m in dict.fromkeys(runs)}
    return {"stops": len(stops), "modules": len(set(path)), "returns": returns, "visits": visits}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="also write the summary and the path here")
    parser.add_argument("--show", action="store_true", help="print every stop")
    parser.add_argument("--values", action="store_true",
                        help="also follow the config's field values (the same objects) into the calls they reach")
    args = parser.parse_args()
    sys.path.insert(0, str(SRC))
    sys.path.insert(0, str(ROOT / "tests" / "randmask_lab" / "experiment"))
    import transformers

    transformers.logging.set_verbosity_error()
    from tiny import make_tiny_lm

    from randmask_lab.experiment import RunConfig

    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_lm(Path(tmp) / "lm")
        config = RunConfig(model=str(model), task="rte", method="randmask", n_train=4, n_val=2, n_test=0,
                           epochs=1, batch_size=4, max_length=64, out_dir=str(Path(tmp) / "runs"), progress=False,
                           threads=1, device="cpu", precision="32")
        stops = trace(config, args.values)
    result = summary(stops)
    if args.show:
        for module, name in stops:
            print(f"{module}: {name}")
    print(f"stops {result['stops']}, modules {result['modules']}, returns {result['returns']}")
    print("visits per module: " + ", ".join(f"{m} {n}" for m, n in result["visits"].items()))
    if args.json:
        args.json.write_text(json.dumps({**result, "path": stops}, indent=1) + "\n")


if __name__ == "__main__":
    main()
