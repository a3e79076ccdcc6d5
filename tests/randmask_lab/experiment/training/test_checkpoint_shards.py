"""Per-rank checkpoint parts of a sharded (FSDP2) run: two gloo ranks fully fine-tune a tiny MLP whose rows do not
split evenly (3 rows: 2 + 1; 1 row: 1 + 0); each rank writes its own shards, with no gather, and resumes to the
values of a run that was never stopped; one process reassembles the parts; damaged parts are one-line RunErrors."""

from __future__ import annotations

import json
import shutil
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from tests.conftest import end_spawned_rank, free_port, start_spawned_rank

from randmask_lab.errors import RunError
from randmask_lab.experiment.training.checkpoint import TrainState, load_checkpoint, save_checkpoint
from randmask_lab.methods import PreparedModel, TrainableReport

WORLD = 2
STATE = TrainState(epoch=1, global_step=2, best_epoch=1, history=[{"epoch": 1, "val_loss": 0.5}])


def _model_and_optimizer(seed: int, sharded: bool) -> tuple[PreparedModel, torch.optim.AdamW]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
    if sharded:
        from torch.distributed.fsdp import fully_shard

        fully_shard(model)
    return PreparedModel(model, TrainableReport("full", 0, 0)), torch.optim.AdamW(model.parameters(), lr=1e-2)


def _train(prepared: PreparedModel, optimizer: torch.optim.Optimizer, steps: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)  # the same batch on every rank: the averaged gradient is one rank's
    for _ in range(steps):
        prepared.model(torch.randn(5, 4, generator=gen)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()


def _whole(prepared: PreparedModel) -> dict[str, torch.Tensor]:
    from randmask_lab.methods.trainable import trainable_tensors

    return trainable_tensors(prepared.model)  # gathers (a collective): every rank calls it


def _resume(folder: Path, out: Path, rank: int, name: str) -> None:
    """Load ``folder`` into another sharded model, train on, and (rank 0) write the values reached."""
    prepared, opt = _model_and_optimizer(1, sharded=True)
    _train(prepared, opt, 1, seed=9)  # other values, moments and RNG state, all to be replaced
    load_checkpoint(folder, prepared, opt, "r")
    _train(prepared, opt, 2, seed=3)
    values = _whole(prepared)
    if rank == 0:
        save_file(values, str(out / name))


def _worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    import randmask_lab.experiment.training.checkpoint_shards as shards
    from randmask_lab.experiment.training.checkpoint_shards import trainable_copy

    start_spawned_rank(rank, port, WORLD)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))  # a rank left waiting fails the test, not hangs
    out = Path(out_dir)
    prepared, opt = _model_and_optimizer(0, sharded=True)
    _train(prepared, opt, 2, seed=2)
    best = trainable_copy(prepared.model)
    gathered, full = [], DTensor.full_tensor
    DTensor.full_tensor = lambda self, *a, **k: gathered.append(tuple(self.shape)) or full(self, *a, **k)
    save_checkpoint(out / "parts", STATE, prepared, opt, best, "r", write=rank == 0)
    DTensor.full_tensor = full
    (out / f"gathered{rank}.json").write_text(json.dumps(gathered))
    save_checkpoint(out / "whole", STATE, prepared, opt, _whole(prepared), "r", write=rank == 0, whole=True)
    dist.barrier()
    _train(prepared, opt, 2, seed=3)
    want = _whole(prepared)
    if rank == 0:
        save_file(want, str(out / "want.safetensors"))
        save_file({f"{n}.rank0": t for n, t in best.items()}, str(out / "best0.safetensors"))
    read, real = [], shards.read_tensors
    shards.read_tensors = lambda path, *a, **k: read.append(Path(path).name) or real(path, *a, **k)
    _resume(out / "parts", out, rank, "from_parts.safetensors")
    shards.read_tensors = real
    (out / f"read{rank}.json").write_text(json.dumps(read))
    _resume(out / "whole", out, rank, "from_whole.safetensors")  # the single-file format of a sharded run
    part = out / "parts" / "trainable-00000002-rank1-of-2.safetensors"
    dist.barrier()
    if rank == 0 and part.exists():  # every rank must stop on it, not only the rank whose part it is
        part.rename(out / "moved.safetensors")
    dist.barrier()
    try:
        _resume(out / "parts", out, rank, "never.safetensors")
    except RunError as err:
        (out / f"missing{rank}.txt").write_text(str(err))
    dist.barrier()
    if rank == 0 and (out / "moved.safetensors").exists():
        (out / "moved.safetensors").rename(part)
    _stale_best(out, rank, prepared, opt)
    end_spawned_rank()


def _stale_best(out: Path, rank: int, prepared: PreparedModel, opt: torch.optim.Optimizer) -> None:
    """A killed attempt left this rank's best-epoch2 part (written, state.json not); the next save at epoch 2 must
    write its own best, not name the killed attempt's file (which its re-run need not reproduce bit for bit)."""
    from randmask_lab.experiment.training.checkpoint_shards import trainable_copy

    folder = out / "stale"
    save_checkpoint(folder, STATE, prepared, opt, trainable_copy(prepared.model), "r", write=rank == 0)
    fresh = trainable_copy(prepared.model)
    save_file({n: t + 1 for n, t in fresh.items()}, str(folder / f"best-epoch2-rank{rank}-of-{WORLD}.safetensors"))
    later = TrainState(epoch=2, global_step=4, best_epoch=2, history=[{"epoch": 2, "val_loss": 0.4}])
    save_checkpoint(folder, later, prepared, opt, fresh, "r", write=rank == 0)
    best = load_checkpoint(folder, prepared, opt, "r")[1]
    (out / f"stale{rank}.json").write_text(json.dumps(_equal(best, fresh)))


def _three_ranks(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    start_spawned_rank(rank, port, 3)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    _resume(Path(out_dir) / "parts", Path(out_dir), rank, "three_ranks.safetensors")
    end_spawned_rank()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """The folder where two ranks saved, resumed and refused their checkpoints (one spawn for the module)."""
    out = tmp_path_factory.mktemp("shards")
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return out


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_each_rank_writes_its_own_shards_without_a_gather(two_ranks):
    names = sorted(p.name for p in (two_ranks / "parts").iterdir())
    assert names == sorted(["state.json", "method-00000002.safetensors",
                            *[f"{role}-{tag}-rank{r}-of-2.safetensors" for r in range(WORLD)
                              for role, tag in [("trainable", "00000002"), ("optimizer", "00000002"),
                                                ("best", "epoch1")]]])
    assert [json.loads((two_ranks / f"gathered{r}.json").read_text()) for r in range(WORLD)] == [[], []]
    rank1 = load_file(str(two_ranks / "parts" / "trainable-00000002-rank1-of-2.safetensors"))
    assert {n: tuple(t.shape) for n, t in rank1.items()} == {"0.weight": (1, 4), "0.bias": (1,), "2.weight": (0, 3),
                                                             "2.bias": (0,)}
    header = json.loads((two_ranks / "parts" / "state.json").read_text())
    assert header["shards"]["world"] == 2 and header["files"] == {"method": "method-00000002.safetensors"}
    assert header["shards"]["layout"]["trainable"]["0.weight"] == {"shape": [3, 4], "dim": 0, "offsets": [0, 2],
                                                                   "lengths": [2, 1]}
    assert header["shards"]["layout"]["optimizer"]["state.2.step"] == {"shape": [], "dim": None}
    best0 = load_file(str(two_ranks / "parts" / "best-epoch1-rank0-of-2.safetensors"))
    assert _equal({f"{n}.rank0": t for n, t in best0.items()}, load_file(str(two_ranks / "best0.safetensors")))


def test_each_rank_resumes_from_its_own_parts_to_the_uninterrupted_values(two_ranks):
    want = load_file(str(two_ranks / "want.safetensors"))
    assert _equal(load_file(str(two_ranks / "from_parts.safetensors")), want)
    for r in range(WORLD):
        read = json.loads((two_ranks / f"read{r}.json").read_text())
        assert read and all(f"-rank{r}-of-2." in name for name in read)


def test_a_best_part_a_killed_attempt_left_is_written_again_not_reused(two_ranks):
    assert [json.loads((two_ranks / f"stale{r}.json").read_text()) for r in range(WORLD)] == [True, True]


def test_a_sharded_runs_single_file_checkpoint_still_resumes(two_ranks):
    assert _equal(load_file(str(two_ranks / "from_whole.safetensors")), load_file(str(two_ranks / "want.safetensors")))


def test_a_missing_part_stops_every_rank_in_one_line(two_ranks):
    for r in range(WORLD):
        message = (two_ranks / f"missing{r}.txt").read_text()
        assert "\n" not in message and "is damaged (rank 1's trainable part " in message
        assert "trainable-00000002-rank1-of-2.safetensors is missing" in message and message.endswith(
            "run the same command with --restart to discard it and start the run over")


def test_one_process_resumes_from_every_ranks_parts_put_back_together(two_ranks, tmp_path):
    """A resume at another world size (here 1): the parts are joined along their shard dim."""
    prepared, opt = _model_and_optimizer(1, sharded=False)
    state, best = load_checkpoint(two_ranks / "parts", prepared, opt, "r")
    assert state == STATE and tuple(best["0.weight"].shape) == (3, 4)
    _train(prepared, opt, 2, seed=3)
    got = {n: p.detach() for n, p in prepared.model.named_parameters()}
    want = load_file(str(two_ranks / "want.safetensors"))
    assert got.keys() == want.keys()
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6)


def test_three_ranks_resume_from_two_ranks_parts(two_ranks):
    """Another world size, sharded: every rank joins the two ranks' parts and takes its shard of 3 (1 + 1 + 1 rows)."""
    assert (two_ranks / "parts" / "trainable-00000002-rank1-of-2.safetensors").is_file()  # parts, not one file
    mp.spawn(_three_ranks, args=(free_port(), str(two_ranks)), nprocs=3, join=True)
    got, want = load_file(str(two_ranks / "three_ranks.safetensors")), load_file(str(two_ranks / "want.safetensors"))
    assert got.keys() == want.keys()
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6)


def _copy(two_ranks: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "ckpt"
    shutil.copytree(two_ranks / "parts", folder)
    return folder


def _edit(folder: Path, fn) -> None:
    header = json.loads((folder / "state.json").read_text())
    fn(header)
    (folder / "state.json").write_text(json.dumps(header))


def _replace_part(folder: Path) -> None:
    """Rank 1's trainable part of another step: other values, under this step's name."""
    path = folder / "trainable-00000002-rank1-of-2.safetensors"
    save_file({n: t + 1 for n, t in load_file(str(path)).items()}, str(path))


def _set(path: list, value):
    def edit(header):
        node = header
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return edit


@pytest.mark.parametrize(("damage", "match"), [
    (lambda f: (f / "optimizer-00000002-rank1-of-2.safetensors").unlink(),
     "rank 1's optimizer part optimizer-00000002-rank1-of-2.safetensors is missing"),
    (_replace_part, "does not match the checksum recorded"),
    (lambda f: (f / "best-epoch1-rank0-of-2.safetensors").write_bytes(b"\0" * 8), "bytes, not the .* recorded"),
    (lambda f: _edit(f, _set(["shards", "files", "trainable", 1], "trainable-00000001-rank1-of-2.safetensors")),
     "its rank 1 trainable part is 'trainable-00000001-rank1-of-2.safetensors', not "
     "'trainable-00000002-rank1-of-2.safetensors' \\(a part of another step\\)"),
    (lambda f: _edit(f, _set(["shards", "files", "optimizer", 0], "../../etc/passwd.safetensors")),
     "not a .safetensors file name in the checkpoint folder"),
    (lambda f: _edit(f, _set(["shards", "files", "best", 1], "/dev/zero")), "not a .safetensors file name"),
    (lambda f: _edit(f, _set(["shards", "layout", "trainable", "0.weight", "lengths"], [2, 2])),
     "its shard layout of '0.weight' .* does not tile its shape \\[3, 4\\] over 2 ranks"),
    (lambda f: _edit(f, _set(["shards", "layout", "optimizer", "state.0.exp_avg", "offsets"], [0, 1])),
     "shard layout of 'state.0.exp_avg' .* does not tile"),
    (lambda f: _edit(f, _set(["shards", "layout", "trainable", "0.weight", "dim"], 2)), "does not tile"),
    (lambda f: _edit(f, _set(["shards", "world"], 3)), "its trainable parts are not a list of 3 file names"),
    (lambda f: _edit(f, lambda h: h["shards"]["layout"]["trainable"].pop("2.bias")), "disagree on '2.bias'"),
    (lambda f: _edit(f, lambda h: h["sha256"].pop("optimizer-00000002-rank0-of-2.safetensors")),
     "its optimizer parts lack their recorded SHA-256 or size"),
])
def test_damaged_or_crafted_parts_are_one_line_run_errors(two_ranks, tmp_path, damage, match):
    folder = _copy(two_ranks, tmp_path)
    damage(folder)
    with pytest.raises(RunError, match=f"is damaged \\(.*{match}") as err:
        load_checkpoint(folder, *_model_and_optimizer(1, sharded=False), "r")
    assert "\n" not in str(err.value) and str(err.value).endswith("--restart to discard it and start the run over")
