"""FSDP2 (``fully_shard`` per decoder layer, then the root, after ``apply_masking``) on 2 CPU ranks with gloo:
the same losses as one process, the same adapter file as an unsharded model, and O(nnz) writes into local shards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tests.conftest import end_spawned_rank, free_port, start_spawned_rank

import randmask
from randmask import MaskingConfig, apply_masking, load_adapter, masked_layers, save_adapter

WORLD, STEPS, LR = 2, 5, 1e-2
CONFIG = dict(targets=["q_proj", "v_proj", "down_proj"], density=0.2, seed=0)  # down_proj: (32, 64), not square


def _base():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=32, num_hidden_layers=2, intermediate_size=64, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    return tf.LlamaForCausalLM(cfg).eval()  # eval: no dropout


def _batches() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 128, (2 * WORLD, 12), generator=gen) for _ in range(STEPS)]


def _probe() -> torch.Tensor:
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(2))


def _train(model, rows: slice) -> list[float]:
    """5 AdamW steps on ``rows`` of each batch; the loss is the mean over ranks (equal token counts)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR)
    losses = []
    for ids in _batches():
        ids = ids[rows]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = loss.detach()
        if dist.is_initialized():
            dist.all_reduce(loss, op=dist.ReduceOp.AVG)
        losses.append(loss.item())
    return losses


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _with_other_adapter(model):
    """A second, frozen adapter with overlapping masks and nonzero values; "default" made active again."""
    apply_masking(model, MaskingConfig(**{**CONFIG, "seed": 1}), adapter_name="other")
    gen = torch.Generator().manual_seed(3)
    for layer in masked_layers(model).values():
        other = layer.adapters["other"]
        other.values.requires_grad_(False)
        layer.adapters["default"].values.requires_grad_(True)  # apply_masking froze it for "other"
        with torch.no_grad():
            other.values.copy_(torch.randn(other.nnz, generator=gen) * 0.05)
    randmask.set_adapter(model, "default")
    return model


def _worker(rank: int, port: int, out: str) -> None:
    from torch.distributed.fsdp import fully_shard

    start_spawned_rank(rank, port, WORLD)
    dist.init_process_group("gloo")
    model = _with_other_adapter(apply_masking(_base(), MaskingConfig(**CONFIG)))
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    layer0 = model.model.layers[0].self_attn.q_proj
    sharded = {"weight": randmask.sharding.is_sharded(layer0.weight),
               "values": randmask.sharding.is_sharded(layer0.adapters["default"].values)}
    try:  # mixed batches are for unsharded weights: refused, the weights untouched
        with randmask.mixed_batch(model, ["default", randmask.BASE_ADAPTER]):
            pass
        sharded["mixed_batch_refused"] = False
    except randmask.MaskingError as e:
        sharded["mixed_batch_refused"] = "sharded" in str(e)
    losses = _train(model, slice(2 * rank, 2 * rank + 2))
    save_adapter(model, Path(out) / "sharded")  # every rank calls it; rank 0 writes
    probe = _probe()
    logits = _logits(model, probe)
    with randmask.disable_adapter(model):  # W0 written into each rank's shard, then W0 + delta again
        base_logits = _logits(model, probe)
    after = _logits(model, probe)
    # "other" holds no W0 (only the active adapter does): switching to it gathers W0 from the shards.
    randmask.set_adapter(model, "other")
    other_logits = _logits(model, probe)
    save_adapter(model, Path(out) / "other", adapter_name="other")
    randmask.set_adapter(model, "default")
    save_adapter(model, Path(out) / "other_inactive", adapter_name="other")  # W0 read from the restored shards
    sharded["back_to_default"] = bool(torch.equal(_logits(model, probe), logits))
    merged = randmask.merge_and_unload(model)  # the delta written into the local shards for good
    merged_logits = _logits(merged, probe)
    q_weight = merged.model.layers[0].self_attn.q_proj.weight.full_tensor()
    if rank == 0:
        torch.save({"losses": torch.tensor(losses, dtype=torch.float64), "logits": logits, "base": base_logits,
                    "after": after, "merged": merged_logits, "q_weight": q_weight, "other": other_logits},
                   Path(out) / "rank0.pt")
        (Path(out) / "sharded.json").write_text(json.dumps(sharded))
    dist.barrier()
    end_spawned_rank()



def test_fsdp2_trains_saves_and_loads_like_one_process(tmp_path):
    pytest.importorskip("transformers")
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this torch build")
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    got = torch.load(tmp_path / "rank0.pt")
    assert json.loads((tmp_path / "sharded.json").read_text()) == {"weight": True, "values": True,
                                                                           "mixed_batch_refused": True,
                                                                           "back_to_default": True}

    single = apply_masking(_base(), MaskingConfig(**CONFIG))
    losses = _train(single, slice(None))
    torch.testing.assert_close(got["losses"], torch.tensor(losses, dtype=torch.float64), rtol=0, atol=1e-5)

    # The sharded run's file is what save_adapter writes for an unsharded model holding the same values.
    header = json.loads((tmp_path / "sharded" / "adapter_config.json").read_text())
    assert header["trainable"] == sum(a.nnz for layer in masked_layers(single).values()
                                      for a in layer.adapters.values())
    loaded = load_adapter(_base(), tmp_path / "sharded")
    save_adapter(loaded, tmp_path / "resaved")
    for name in ("adapter.safetensors", "adapter_config.json"):
        assert (tmp_path / "sharded" / name).read_bytes() == (tmp_path / "resaved" / name).read_bytes(), name
    # ... and an unsharded base with that file computes what the sharded model computed.
    probe = _probe()
    torch.testing.assert_close(_logits(loaded, probe), got["logits"], rtol=0, atol=1e-6)
    torch.testing.assert_close(_logits(single, probe), got["logits"], rtol=0, atol=1e-4)  # trained alike
    torch.testing.assert_close(got["base"], _logits(_base(), probe), rtol=0, atol=1e-6)
    torch.testing.assert_close(got["after"], got["logits"], rtol=0, atol=0)
    torch.testing.assert_close(got["merged"], got["logits"], rtol=0, atol=1e-6)
    merged = randmask.merge_and_unload(loaded)
    torch.testing.assert_close(got["q_weight"], merged.model.layers[0].self_attn.q_proj.weight, rtol=0, atol=0)
    # The frozen second adapter, switched to after sharding: what an unsharded model with it computes, and its
    # file (saved while active, and while inactive) is the unsharded model's byte for byte.
    other = _with_other_adapter(apply_masking(_base(), MaskingConfig(**CONFIG)))
    randmask.set_adapter(other, "other")
    torch.testing.assert_close(got["other"], _logits(other, probe), rtol=0, atol=1e-6)
    save_adapter(other, tmp_path / "other_single", adapter_name="other")
    for folder in ("other", "other_inactive"):
        for name in ("adapter.safetensors", "adapter_config.json"):
            assert ((tmp_path / folder / name).read_bytes() == (tmp_path / "other_single" / name).read_bytes()), \
                (folder, name)
