"""FSDP2 over a quantized base (torchtune's QLoRA recipe: torchao ``NF4Tensor`` weights, ``fully_shard`` per decoder
layer) on 2 CPU ranks with gloo: the delta path on every rank, the losses and the adapter file of one process.

Between forwards FSDP2 holds each weight as a DTensor over this rank's NF4 shard; the layer read that as a float
weight, so its path flipped to in place outside the forward, and ``save_adapter`` failed restoring W0 into it."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tests.conftest import end_spawned_rank, free_port, start_spawned_rank
from tests.randmask.quantized_models import quantize_nf4
from tests.randmask.test_fsdp2 import CONFIG, WORLD, _base, _logits, _probe, _train, _with_other_adapter

import randmask
from randmask import MaskingConfig, MaskingError, apply_masking, load_adapter, masked_layers, save_adapter


def _nf4_base() -> torch.nn.Module:
    """The tiny Llama with every decoder Linear an ``NF4Tensor`` (torchao's ``quantize_``, as torchtune's QLoRA)."""
    return quantize_nf4(_base())


def _worker(rank: int, port: int, out: str) -> None:
    from torch.distributed.fsdp import fully_shard

    start_spawned_rank(rank, port, WORLD)
    dist.init_process_group("gloo")
    warnings.simplefilter("ignore")
    model = _with_other_adapter(apply_masking(_nf4_base(), MaskingConfig(**CONFIG)))
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    found = {"sharded": randmask.sharding.is_sharded(model.model.layers[0].self_attn.q_proj.weight),
             "delta_path": [layer.delta_path for layer in masked_layers(model).values()]}
    losses = _train(model, slice(2 * rank, 2 * rank + 2))
    save_adapter(model, Path(out) / "sharded")  # every rank calls it; rank 0 writes
    probe = _probe()
    logits = _logits(model, probe)
    with randmask.disable_adapter(model):
        base_logits = _logits(model, probe)
    randmask.set_adapter(model, "other")
    other_logits = _logits(model, probe)
    randmask.set_adapter(model, "default")
    found["back_to_default"] = bool(torch.equal(_logits(model, probe), logits))
    try:
        randmask.merge_and_unload(model)
        found["merge_refused"] = False
    except MaskingError as err:
        found["merge_refused"] = "quantized" in str(err)
    found["unchanged_after_merge_refused"] = bool(torch.equal(_logits(model, probe), logits))
    if rank == 0:
        torch.save({"losses": torch.tensor(losses, dtype=torch.float64), "logits": logits, "base": base_logits,
                    "other": other_logits}, Path(out) / "rank0.pt")
        (Path(out) / "found.json").write_text(json.dumps(found))
    dist.barrier()
    end_spawned_rank()


def test_fsdp2_over_an_nf4_base_trains_and_saves_like_one_process(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("torchao")
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this torch build")
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    got = torch.load(tmp_path / "rank0.pt")
    assert json.loads((tmp_path / "found.json").read_text()) == {
        "sharded": True, "delta_path": [True] * 6, "back_to_default": True, "merge_refused": True,
        "unchanged_after_merge_refused": True}
    single = apply_masking(_nf4_base(), MaskingConfig(**CONFIG))
    torch.testing.assert_close(got["losses"], torch.tensor(_train(single, slice(None)), dtype=torch.float64),
                               rtol=0, atol=1e-5)
    probe = _probe()
    torch.testing.assert_close(got["base"], _logits(_nf4_base(), probe), rtol=0, atol=1e-6)
    # The sharded run's file is what an unsharded NF4 base with the same values writes, byte for byte.
    loaded = load_adapter(_nf4_base(), tmp_path / "sharded")
    save_adapter(loaded, tmp_path / "resaved")
    for name in ("adapter.safetensors", "adapter_config.json"):
        assert (tmp_path / "sharded" / name).read_bytes() == (tmp_path / "resaved" / name).read_bytes(), name
    torch.testing.assert_close(_logits(loaded, probe), got["logits"], rtol=0, atol=1e-6)
    other = _with_other_adapter(apply_masking(_nf4_base(), MaskingConfig(**CONFIG)))
    randmask.set_adapter(other, "other")  # the frozen second adapter, switched to after sharding
    torch.testing.assert_close(got["other"], _logits(other, probe), rtol=0, atol=1e-6)


def _bitsandbytes_worker(rank: int, port: int, folder: str, out: str) -> None:
    from tests.randmask.quantized_models import load_quantized
    from torch.distributed.fsdp import fully_shard

    start_spawned_rank(rank, port, WORLD)
    dist.init_process_group("gloo")
    warnings.simplefilter("ignore")
    model = apply_masking(load_quantized(Path(folder), "nf4"), MaskingConfig(**CONFIG))
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    try:
        _train(model, slice(2 * rank, 2 * rank + 2))
        message = ""
    except MaskingError as err:
        message = str(err)
    if rank == 0:
        Path(out).write_text(message)
    dist.barrier()
    end_spawned_rank()


def test_fsdp2_over_a_bitsandbytes_base_is_refused_in_one_line(tmp_path):
    """fully_shard turns a Params4bit into a plain uint8 DTensor: the layer took it for a float weight and failed on
    an internal error. Now the first forward names what happened and the two bases that shard."""
    pytest.importorskip("transformers")
    pytest.importorskip("bitsandbytes")
    from tests.randmask.quantized_models import save_tiny_llama

    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this torch build")
    folder = save_tiny_llama(tmp_path / "llama")
    mp.spawn(_bitsandbytes_worker, args=(free_port(), str(folder), str(tmp_path / "message")), nprocs=WORLD,
             join=True)
    assert (tmp_path / "message").read_text().startswith(
        "Linear4bit's weight is now a plain torch.uint8 tensor, which randmask can neither write into nor add a delta "
        "beside: a quantized weight lost its type (FSDP2's fully_shard does that")


def _mask_after_sharding_worker(rank: int, port: int, out: str) -> None:
    from torch.distributed.fsdp import fully_shard

    start_spawned_rank(rank, port, WORLD)
    dist.init_process_group("gloo")
    warnings.simplefilter("ignore")
    found = {}
    for kind, make in (("float", _base), ("nf4", _nf4_base)):
        model = make()
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        before = [(name, p.requires_grad) for name, p in model.named_parameters()]
        try:
            apply_masking(model, MaskingConfig(**CONFIG))
            found[kind] = ""
        except MaskingError as err:
            found[kind] = str(err)
        found[f"{kind}_untouched"] = before == [(name, p.requires_grad) for name, p in model.named_parameters()]
    if rank == 0:
        Path(out).write_text(json.dumps(found))
    dist.barrier()
    end_spawned_rank()


def test_masking_a_model_sharded_already_is_refused_and_changes_nothing(tmp_path):
    """FSDP2 shards and reduces the parameters it found at fully_shard: values added afterwards were plain tensors
    that every rank trained on its own rows, silently apart, over an NF4 base (a float one failed inside DTensor)."""
    pytest.importorskip("transformers")
    pytest.importorskip("torchao")
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this torch build")
    mp.spawn(_mask_after_sharding_worker, args=(free_port(), str(tmp_path / "found.json")), nprocs=WORLD, join=True)
    found = json.loads((tmp_path / "found.json").read_text())
    for kind in ("float", "nf4"):
        assert found[kind].startswith("model.layers.0.self_attn.q_proj: its weight is sharded already (FSDP2's "
                                      "fully_shard, or tensor parallel). Apply randmask"), found[kind]
        assert found[f"{kind}_untouched"], kind
