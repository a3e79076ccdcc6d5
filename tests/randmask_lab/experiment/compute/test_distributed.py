"""Two CPU processes (gloo): identical masks, all-reduced gradients, and a DDP run that matches one process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from tests.conftest import end_spawned_rank, free_port, start_spawned_rank

from randmask import masked_layers
from randmask_lab.experiment import RunConfig, run_training
from randmask_lab.experiment.compute.distributed import init_distributed, wrap_ddp
from randmask_lab.methods import prepare_method

WORLD = 2


def _batch(rank: int) -> torch.Tensor:
    return torch.randint(3, 200, (2, 10), generator=torch.Generator().manual_seed(100 + rank))


def _masked_grads(model_dir: str, ids: torch.Tensor | None, ddp_ctx=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask indices, values gradients) of a fresh randmask model after one backward on ``ids``."""
    import transformers as tf

    prepared = prepare_method("randmask", tf.AutoModelForCausalLM.from_pretrained(model_dir), ratio=0.02, seed=0)
    model = wrap_ddp(prepared.model, ddp_ctx) if ddp_ctx is not None else prepared.model
    batches = [ids] if ids is not None else [_batch(r) for r in range(WORLD)]
    for b in batches:  # single process: the mean of the ranks' losses, as DDP averages
        (model(input_ids=b, labels=b).loss / len(batches)).backward()
    indices = torch.cat([m.adapters["default"].indices for m in masked_layers(prepared.model).values()])
    return indices, torch.cat([p.grad.reshape(-1) for p in prepared.trainable_parameters()])


def _worker(rank: int, port: int, model_dir: str, run_kwargs: dict, out: str) -> None:
    start_spawned_rank(rank, port, WORLD)
    ctx = init_distributed("cpu")
    indices, grads = _masked_grads(model_dir, _batch(rank), ctx)
    record = run_training(RunConfig(**run_kwargs), ctx=ctx)
    trained = load_file(str(Path(record.run_dir) / "trainable" / "trainable.safetensors")) if rank == 0 else {}
    save_file({"indices": indices, "grads": grads, **{f"run.{k}": v for k, v in trained.items()},
               "test": torch.tensor([record.test_metric])}, f"{out}/rank{rank}.safetensors")
    end_spawned_rank()



def test_two_gloo_processes_agree_with_one(tiny_lm, run_kwargs, tmp_path):
    kwargs = {**run_kwargs, "model": tiny_lm, "method": "randmask", "ratio": 0.02, "lr": 1e-2, "threads": None}
    ddp_kwargs = {**kwargs, "batch_size": 2, "out_dir": str(tmp_path / "ddp")}  # 2 ranks x 2 = 4 per step
    mp.spawn(_worker, args=(free_port(), tiny_lm, ddp_kwargs, str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(WORLD)]

    indices, grads = _masked_grads(tiny_lm, None)
    for result in ranks:
        assert torch.equal(result["indices"], indices)  # same masks on every rank, no communication
        torch.testing.assert_close(result["grads"], grads, rtol=1e-5, atol=1e-7)  # all-reduced mean
    torch.testing.assert_close(ranks[0]["grads"], ranks[1]["grads"], rtol=0, atol=0)

    single = run_training(RunConfig(**{**kwargs, "batch_size": 4, "out_dir": str(tmp_path / "one")}))
    trained = load_file(str(Path(single.run_dir) / "trainable" / "trainable.safetensors"))
    for name, value in trained.items():
        torch.testing.assert_close(ranks[0][f"run.{name}"], value, rtol=1e-4, atol=1e-5)
    assert ranks[0]["test"].item() == ranks[1]["test"].item() == pytest.approx(single.test_metric)
