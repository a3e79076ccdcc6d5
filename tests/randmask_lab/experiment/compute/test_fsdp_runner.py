"""The runner's --fsdp: two CPU processes (gloo) shard a tiny Llama with FSDP2 and end where one process ends."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from tests.conftest import end_spawned_rank, free_port, start_spawned_rank

from randmask_lab.errors import RunError
from randmask_lab.experiment import RunConfig, run_training
from randmask_lab.experiment.compute.distributed import init_distributed

WORLD = 2


def _worker(rank: int, port: int, run_kwargs: dict, out: str) -> None:
    start_spawned_rank(rank, port, WORLD)
    ctx = init_distributed("cpu")
    record = run_training(RunConfig(**run_kwargs), ctx=ctx)
    if rank == 0:
        (Path(out) / "run_dir").write_text(record.run_dir)
        (Path(out) / "test").write_text(repr(record.test_metric))
    end_spawned_rank()



@pytest.mark.slow
@pytest.mark.parametrize(("max_grad_norm", "quantize"), [(None, "none"), (1e-3, "none"), (None, "ao-nf4")])
def test_an_fsdp_run_matches_one_process(tiny_lm, run_kwargs, tmp_path, max_grad_norm, quantize):
    """1e-3 clips every step: the norm over sharded DTensors. ao-nf4: torchtune's QLoRA-FSDP2 (NF4Tensor shards)."""
    if quantize != "none":
        pytest.importorskip("torchao")
    kwargs = {**run_kwargs, "model": tiny_lm, "method": "randmask", "ratio": 0.02, "lr": 1e-2, "threads": None,
              "checkpoint_every": -1, "max_grad_norm": max_grad_norm, "quantize": quantize}
    sharded = {**kwargs, "batch_size": 2, "fsdp": True, "out_dir": str(tmp_path / "fsdp")}  # 2 ranks x 2 = 4
    mp.spawn(_worker, args=(free_port(), sharded, str(tmp_path)), nprocs=WORLD, join=True)
    run_dir = Path((tmp_path / "run_dir").read_text())
    single = run_training(RunConfig(**{**kwargs, "batch_size": 4, "out_dir": str(tmp_path / "one")}))
    trained = load_file(str(Path(single.run_dir) / "trainable" / "trainable.safetensors"))
    got = load_file(str(run_dir / "trainable" / "trainable.safetensors"))
    assert set(got) == set(trained)
    for name, value in trained.items():
        torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-5)
    assert float((tmp_path / "test").read_text()) == pytest.approx(single.test_metric)
    assert (run_dir / "adapter" / "adapter.safetensors").is_file()


def test_fsdp_needs_several_processes(tiny_lm, run_kwargs):
    with pytest.raises(RunError, match="torchrun"):
        run_training(RunConfig(**{**run_kwargs, "model": tiny_lm, "method": "randmask", "fsdp": True}))


def _resume_worker(rank: int, port: int, run_kwargs: dict, out: str, stop_after: int | None) -> None:
    from randmask_lab.experiment.training.loop import RunInterrupted

    start_spawned_rank(rank, port, WORLD)
    ctx = init_distributed("cpu")
    try:
        record = run_training(RunConfig(**run_kwargs), stop_after=stop_after, ctx=ctx)
        if rank == 0:
            (Path(out) / "run_dir").write_text(record.run_dir)
            (Path(out) / "resumed_at").write_text(repr(record.resumed_at))
    except RunInterrupted:
        pass
    end_spawned_rank()


@pytest.mark.slow
@pytest.mark.parametrize("quantize", ["none", "ao-nf4"])
def test_an_fsdp_run_killed_mid_way_resumes_to_the_uninterrupted_runs_values(tiny_lm, run_kwargs, tmp_path,
                                                                              quantize):
    """Checkpoints of a sharded run: every rank writes its own shards of the values and AdamW's moments (per-rank
    parts, nothing gathered) and reads them back at the restart."""
    if quantize != "none":
        pytest.importorskip("torchao")
    kwargs = {**run_kwargs, "model": tiny_lm, "method": "randmask", "ratio": 0.02, "lr": 1e-2, "threads": None,
              "batch_size": 2, "fsdp": True, "epochs": 3, "checkpoint_every": 2, "quantize": quantize}
    straight = {**kwargs, "out_dir": str(tmp_path / "straight")}
    mp.spawn(_resume_worker, args=(free_port(), straight, str(tmp_path), None), nprocs=WORLD, join=True)
    want = load_file(str(Path((tmp_path / "run_dir").read_text()) / "trainable" / "trainable.safetensors"))
    killed = {**kwargs, "out_dir": str(tmp_path / "killed")}  # 3 steps an epoch: dies in epoch 2, after step 4's
    mp.spawn(_resume_worker, args=(free_port(), killed, str(tmp_path), 5), nprocs=WORLD, join=True)
    (parts,) = (tmp_path / "killed").glob("**/checkpoint")
    assert sorted(p.name for p in parts.glob("trainable-*")) == [f"trainable-00000004-rank{r}-of-2.safetensors"
                                                                 for r in range(WORLD)]
    mp.spawn(_resume_worker, args=(free_port(), killed, str(tmp_path), None), nprocs=WORLD, join=True)
    assert (tmp_path / "resumed_at").read_text() == "4"
    got = load_file(str(Path((tmp_path / "run_dir").read_text()) / "trainable" / "trainable.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def _indivisible_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist
    import transformers as tf
    from torchao.prototype._nf4tensor_api import NF4WeightOnlyConfig
    from torchao.quantization import quantize_

    from randmask_lab.experiment.compute.distributed import DistContext, wrap_fsdp
    from randmask_lab.experiment.compute.quantize import NF4_BLOCK_SIZE, NF4_SCALER_BLOCK_SIZE

    start_spawned_rank(rank, port, WORLD)
    dist.init_process_group("gloo")
    torch.manual_seed(0)  # one kv head of 8: k_proj and v_proj are 8 x 32, 4 blocks of 64, one group of scales
    model = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=32, num_hidden_layers=1, intermediate_size=64,
                                               num_attention_heads=4, num_key_value_heads=1, vocab_size=64))
    config = NF4WeightOnlyConfig()
    config.block_size, config.scaler_block_size = NF4_BLOCK_SIZE, NF4_SCALER_BLOCK_SIZE
    quantize_(model.model, config)
    try:
        wrap_fsdp(model, DistContext(rank=rank, world=WORLD), "randmask")
        message = ""
    except RunError as err:
        message = str(err)
    if rank == 0:
        Path(out).write_text(message)
    end_spawned_rank()


def test_an_nf4_base_whose_parts_do_not_split_over_the_ranks_is_refused_in_one_line(tmp_path):
    """FSDP2 splits each part of an NF4Tensor evenly over the ranks, and torchao asserts it can: that assertion
    reaches the user as a RunError naming the fix."""
    pytest.importorskip("torchao")
    mp.spawn(_indivisible_worker, args=(free_port(), str(tmp_path / "message")), nprocs=WORLD, join=True)
    message = (tmp_path / "message").read_text()
    assert message.startswith("--fsdp: FSDP2 cannot split this model's weights evenly over 2 ranks (")
    assert "not divisible by 2" in message and message.endswith("run on fewer ranks, or without --quantize")
