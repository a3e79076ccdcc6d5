"""Fuzzed checkpoints: load_checkpoint raises RunError, or the run resumes from what it loaded.

Each example edits one node of ``state.json`` or damages the bytes of it or of one tensor file. A
checkpoint that loads must be usable: the LR schedule at its step, a training step and a new checkpoint
all work. Run in a subprocess under a memory cap (tests/hostile.py).
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from pathlib import Path

import torch
from hypothesis import given
from hypothesis import strategies as st
from tests.hostile import damage_bytes, fuzz_settings, mutate_json, run_limited, to_json_text

FUZZ = fuzz_settings(max_examples=200)
_STATE: dict = {}


def _model_and_optimizer():
    from randmask_lab.methods import PreparedModel, TrainableReport

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model[0].bias.requires_grad_(False)
    return PreparedModel(model, TrainableReport("full", 0, 0)), torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-2)


def _step(prepared, optimizer) -> None:
    prepared.model(torch.randn(5, 4)).pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def _reference() -> Path:
    """One checkpoint after 3 steps, written once per process."""
    from randmask_lab.experiment.training.checkpoint import TrainState, save_checkpoint

    if not _STATE:
        prepared, opt = _model_and_optimizer()
        for _ in range(3):
            _step(prepared, opt)
        folder = Path(tempfile.mkdtemp())
        state = TrainState(epoch=1, step_in_epoch=1, global_step=3, best_epoch=1, best_score=0.5,
                           history=[{"epoch": 1, "train_loss": 0.3, "val_loss": 0.5, "val_metric": None}])
        save_checkpoint(folder, state, prepared, opt, {n: p.detach() for n, p in prepared.model.named_parameters()
                                                       if p.requires_grad}, "run")
        _STATE["folder"] = folder
    return _STATE["folder"]


@FUZZ
@given(st.data())
def fuzz_checkpoint(data) -> None:
    from randmask_lab.errors import RunError
    from randmask_lab.experiment.training.checkpoint import load_checkpoint, save_checkpoint
    from randmask_lab.experiment.training.steps import lr_factor

    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "checkpoint"
        shutil.copytree(_reference(), folder)
        header = json.loads((folder / "state.json").read_text())
        target = data.draw(st.sampled_from(["header", "header bytes", *sorted(header["files"].values())]))
        if target == "header":
            (folder / "state.json").write_bytes(to_json_text(mutate_json(copy.deepcopy(header), data)))
        else:
            path = folder / ("state.json" if target == "header bytes" else target)
            path.write_bytes(damage_bytes(path.read_bytes(), data))
        prepared, opt = _model_and_optimizer()
        try:
            loaded = load_checkpoint(folder, prepared, opt, "run")
        except RunError:
            return
        state, _ = loaded
        for warmup, kind in ((0, "constant"), (5, "linear"), (2, "cosine")):
            lr_factor(state.global_step, 100, warmup, kind)
        _step(prepared, opt)
        save_checkpoint(Path(d) / "again", state, prepared, opt, None, "run")


def run_under_memory_limit() -> None:
    _reference()
    fuzz_checkpoint()
    print("FUZZ-OK")


def test_fuzzed_checkpoints_under_memory_limit() -> None:
    module = "tests.randmask_lab.experiment.training.test_fuzz_checkpoint"
    result = run_limited("run_under_memory_limit()", imports=f"from {module} import run_under_memory_limit")
    assert result.returncode == 0 and "FUZZ-OK" in result.stdout, result.stderr[-4000:]
