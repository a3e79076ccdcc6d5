"""Fuzzed checkpoints: load_checkpoint raises RunError, or the run resumes from what it loaded.

Each example edits one node of ``state.json`` or damages the bytes of it or of one tensor file, of a single-file
checkpoint and of a sharded run's per-rank parts (read back in one process: joined). A checkpoint that loads must
be usable: the LR schedule at its step, a training step and a new checkpoint
all work. Run in a subprocess under a memory cap (tests/hostile.py).
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from itertools import accumulate
from pathlib import Path

import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file
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


def _split(t: torch.Tensor, world: int) -> list[torch.Tensor]:
    """FSDP2's split of dim 0 (``torch.chunk``: uneven, empty shards last); a scalar whole on every rank."""
    if t.dim() == 0:
        return [t] * world
    chunks = list(torch.chunk(t, world, dim=0))
    return chunks + [t[:0]] * (world - len(chunks))


def _sharded_reference(world: int = 2) -> Path:
    """The reference checkpoint as a sharded run of ``world`` ranks writes it: per-rank parts and their layout."""
    from randmask_lab.experiment.training.checkpoint_shards import part_name
    from randmask_lab.methods.trainable import write_tensors

    if "sharded" not in _STATE:
        src, folder = _reference(), Path(tempfile.mkdtemp())
        header = json.loads((src / "state.json").read_text())
        method = header["files"]["method"]
        shutil.copy(src / method, folder / method)
        shards: dict = {"world": world, "files": {}, "sizes": {}, "layout": {}}
        sha256 = {method: header["sha256"][method]}
        for role, tag in (("trainable", "00000003"), ("optimizer", "00000003"), ("best", "epoch1")):
            whole = load_file(str(src / header["files"][role]))
            parts = {n: _split(t, world) for n, t in whole.items()}
            if role != "best":
                shards["layout"][role] = {n: {"shape": list(t.shape), "dim": None} if t.dim() == 0 else {
                    "shape": list(t.shape), "dim": 0, "offsets": [0, *accumulate(len(p) for p in parts[n])][:-1],
                    "lengths": [len(p) for p in parts[n]]} for n, t in whole.items()}
            shards["files"][role] = [part_name(role, tag, r, world) for r in range(world)]
            for r, name in enumerate(shards["files"][role]):
                sha256[name] = write_tensors(folder / name, {n: p[r] for n, p in parts.items()})
                shards["sizes"][name] = (folder / name).stat().st_size
        header.update(files={"method": method}, sha256=sha256, shards=shards)
        (folder / "state.json").write_text(json.dumps(header))
        _STATE["sharded"] = folder
    return _STATE["sharded"]


def test_a_sharded_runs_parts_load_in_one_process_as_its_single_file_does():
    from randmask_lab.experiment.training.checkpoint import load_checkpoint

    whole, parts = _model_and_optimizer(), _model_and_optimizer()
    want, got = load_checkpoint(_reference(), *whole, "run"), load_checkpoint(_sharded_reference(), *parts, "run")
    assert want[0] == got[0] and want[1].keys() == got[1].keys() and all(torch.equal(want[1][k], got[1][k])
                                                                         for k in want[1])
    for a, b in zip(whole[0].model.parameters(), parts[0].model.parameters(), strict=True):
        assert torch.equal(a, b)
    a, b = whole[1].state_dict()["state"], parts[1].state_dict()["state"]
    assert a.keys() == b.keys() and all(a[i].keys() == b[i].keys() and all(torch.equal(a[i][k], b[i][k]) for k in a[i])
                                        for i in a)


def _fuzz_one(data, reference: Path) -> None:
    from randmask_lab.errors import RunError
    from randmask_lab.experiment.training.checkpoint import load_checkpoint, save_checkpoint
    from randmask_lab.experiment.training.steps import lr_factor

    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "checkpoint"
        shutil.copytree(reference, folder)
        header = json.loads((folder / "state.json").read_text())
        target = data.draw(st.sampled_from(["header", "header bytes", *sorted(p.name for p in folder.iterdir()
                                                                              if p.suffix == ".safetensors")]))
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


@FUZZ
@given(st.data())
def fuzz_checkpoint(data) -> None:
    _fuzz_one(data, _reference())


@FUZZ
@given(st.data())
def fuzz_sharded_checkpoint(data) -> None:
    _fuzz_one(data, _sharded_reference())


def run_under_memory_limit() -> None:
    _reference()
    _sharded_reference()
    fuzz_checkpoint()
    fuzz_sharded_checkpoint()
    print("FUZZ-OK")


def test_fuzzed_checkpoints_under_memory_limit() -> None:
    module = "tests.randmask_lab.experiment.training.test_fuzz_checkpoint"
    result = run_limited("run_under_memory_limit()", imports=f"from {module} import run_under_memory_limit")
    assert result.returncode == 0 and "FUZZ-OK" in result.stdout, result.stderr[-4000:]
