"""Data-parallel runs under ``torchrun`` / ``accelerate launch``: DDP, gloo on CPU, nccl on GPU.

Both launchers set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; a plain
``python``/``randmask`` call has none of them and runs as a single process. Masks need no
communication: each matrix's mask is drawn from (mask seed, module name), so every rank draws
the same one (tests/randmask_lab/experiment/compute/test_distributed.py checks it, with the gradients).
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from randmask_lab.errors import RunError


@dataclass(frozen=True)
class DistContext:
    """This process's place in the run: rank, world size, and its device."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """True on the process that writes checkpoints, logs and the results store."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def parse_device(name: str) -> torch.device:
    """``torch.device(name)``, a RunError naming the choices for a name torch does not know."""
    try:
        return torch.device(name)
    except RuntimeError:
        raise RunError(f"--device {name!r} is not a device name; use cpu, cuda, cuda:N or auto") from None


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto``: this rank's GPU when CUDA is available, else the CPU. RunError for a device name torch
    does not know, or a device this machine lacks."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    dev = parse_device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RunError(f"--device {name}: no CUDA GPU is available on this machine; use --device cpu (or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise RunError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)")
    elif dev.type != "cpu":
        raise RunError(f"--device {name}: the runner supports cpu and cuda devices")
    return dev


def launcher_world_size() -> int:
    """How many processes the launcher (torchrun, accelerate launch) started: ``$WORLD_SIZE``, 1 without one."""
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        world = int(value)
    except ValueError:
        raise RunError(f"WORLD_SIZE={value!r} is not a number of processes; unset it, or launch with "
                       "torchrun") from None
    if world < 1:
        raise RunError(f"WORLD_SIZE={world}: a run needs at least one process; unset it, or launch with torchrun")
    return world


def init_distributed(device: str = "auto") -> DistContext:
    """Join the process group a launcher set up (idempotent); a single process without one."""
    world = launcher_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if world <= 1:
        return DistContext(0, 1, dev)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend=backend)
    return DistContext(dist.get_rank(), dist.get_world_size(), dev)


def wrap_ddp(model: nn.Module, ctx: DistContext) -> nn.Module:
    """DDP around ``model`` when several processes run; ``model`` itself otherwise."""
    if not ctx.active:
        return model
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    # Buffers (mask indices, W0 values) are identical by construction: no per-step broadcast.
    # torch >= 2.13 renamed the switch (and deprecated the old name).
    params = inspect.signature(nn.parallel.DistributedDataParallel).parameters
    no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, **no_sync)


def wrap_fsdp(model: nn.Module, ctx: DistContext, method: str) -> nn.Module:
    """``model`` sharded in place with FSDP2: ``fully_shard`` on each decoder layer (the classes transformers lists in
    ``_no_split_modules``), then on the root. RunError where that cannot run."""
    if not ctx.active:
        raise RunError("--fsdp shards the model across processes: start the run with torchrun --nproc-per-node N")
    if method not in ("randmask", "structured"):
        raise RunError(f"--fsdp runs the masking methods (randmask, structured), not {method!r}")
    from torch.distributed.fsdp import fully_shard

    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise RunError(f"--fsdp: {type(model).__name__} lists no decoder-layer class (transformers' _no_split_modules) "
                       "to shard by; run it without --fsdp")
    try:
        for block in blocks:
            fully_shard(block)
        fully_shard(model)
    except AssertionError as err:  # torchao's NF4Tensor asserts that each of its parts splits evenly
        raise RunError(f"--fsdp: FSDP2 cannot split this model's weights evenly over {ctx.world} ranks ({err}); "
                       "an NF4 base (--quantize ao-nf4) needs every part of every weight to divide by the rank "
                       "count: run on fewer ranks, or without --quantize") from None
    return model


def shard(n: int, ctx: DistContext) -> list[int]:
    """This rank's share of ``range(n)`` (every world-th item), for evaluation."""
    return list(range(ctx.rank, n, ctx.world))


def gather_shards(values: list[Any], n: int, ctx: DistContext) -> list[Any]:
    """Inverse of ``shard``: every rank gets all ``n`` values back in order."""
    if not ctx.active:
        return values
    parts: list[Any] = [None] * ctx.world
    dist.all_gather_object(parts, values)
    out: list[Any] = [None] * n
    for rank, part in enumerate(parts):
        out[rank::ctx.world] = part
    return out


def broadcast_object(obj: Any, ctx: DistContext) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not ctx.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (no-op for a single process)."""
    if ctx.active:
        dist.barrier()


def any_rank(flag: bool, ctx: DistContext) -> bool:
    """True if ``flag`` is true on any rank (so all ranks stop together, e.g. on divergence)."""
    if not ctx.active:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=ctx.device if ctx.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return bool(t.item() > 0)
