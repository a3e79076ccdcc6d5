"""Rank 0's memory while a sharded (FSDP2) run saves a checkpoint: per-rank parts vs the single-file format.

    python benchmarks/checkpoint_shards.py [--rounds 5] [--hidden 256] [--json PATH]

Two gloo ranks fully fine-tune a tiny Llama (``--hidden`` wide, 4 layers, vocab 1024, every parameter trained,
``fully_shard`` on each decoder layer and the root as ``--fsdp`` does) and take one AdamW step, so both moments
exist. Each round then saves the same state both ways, in alternating order: ``parts`` (each rank writes its own
shards, nothing gathered) and ``whole`` (``save_checkpoint(whole=True)``: every rank gathers each sharded tensor,
rank 0 keeps them all and writes one file per role). Measured on rank 0 per save: the peak resident set above the
one before the save (the kernel's high-water mark, reset through ``/proc/self/clear_refs`` just before), the bytes
of tensor data it passed to the safetensors writer, and the wall time. glibc is told to map every allocation over
64 KiB on its own (``MALLOC_MMAP_THRESHOLD_``), so a freed buffer leaves the resident set and each save's peak
counts what that save held. Reported: median and range of each, and the per-round ratio whole/parts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))


def _kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _model(hidden: int) -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(hidden_size=hidden, num_hidden_layers=4, intermediate_size=hidden * 8 // 3,
                            num_attention_heads=4, num_key_value_heads=2, vocab_size=1024)
    return tf.LlamaForCausalLM(config)


def _spy_writes(counter: list[int]) -> None:
    """Count the bytes of tensor data handed to ``write_tensors`` (both checkpoint modules' copies of it)."""
    import randmask_lab.experiment.training.checkpoint as whole
    import randmask_lab.experiment.training.checkpoint_shards as shards

    real = whole.write_tensors

    def counted(path, tensors):
        counter[0] += sum(t.numel() * t.element_size() for t in tensors.values())
        return real(path, tensors)

    whole.write_tensors = shards.write_tensors = counted


def _save(variant: str, folder: Path, rank: int, prepared, optimizer, written: list[int]) -> dict[str, float]:
    import torch.distributed as dist

    from randmask_lab.experiment.training.checkpoint import TrainState, save_checkpoint

    dist.barrier()
    written[0], before = 0, _kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS now
    t0 = time.perf_counter()
    save_checkpoint(folder / variant, TrainState(global_step=1), prepared, optimizer, None, "bench",
                    write=rank == 0, whole=variant == "whole")
    seconds = time.perf_counter() - t0
    dist.barrier()
    return {"peak_mb": (_kb("VmHWM") - before) / 1024, "tensor_mb": written[0] / 2**20, "seconds": seconds}


def _worker(rank: int, port: int, rounds: int, hidden: int, out: str) -> None:
    import torch.distributed as dist
    from tests.conftest import start_spawned_rank
    from torch.distributed.fsdp import fully_shard

    from randmask_lab.methods import PreparedModel, TrainableReport

    start_spawned_rank(rank, port, 2)
    dist.init_process_group("gloo")
    model = _model(hidden)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    prepared = PreparedModel(model, TrainableReport("full", 0, 0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, 1024, (2, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    written = [0]
    _spy_writes(written)
    results: dict[str, list] = {"parts": [], "whole": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(rounds):
            for variant in (["parts", "whole"] if i % 2 == 0 else ["whole", "parts"]):
                results[variant].append(_save(variant, Path(tmp), rank, prepared, optimizer, written))
    if rank == 0:
        n = sum(p.numel() for p in model.parameters())
        Path(out).write_text(json.dumps({"parameters": n, "rounds": results}))
    dist.destroy_process_group()
    os._exit(0)


def _summary(xs: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(xs), 2), "min": round(min(xs), 2), "max": round(max(xs), 2)}


def run(rounds: int, hidden: int) -> dict:
    """Spawn the two ranks, measure ``rounds`` rounds, and summarise them (the report ``main`` writes)."""
    from tests.conftest import free_port

    before = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # inherited by the spawned ranks (see the module docstring)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            raw = Path(tmp) / "raw.json"
            mp.spawn(_worker, args=(free_port(), rounds, hidden, str(raw)), nprocs=2, join=True)
            measured = json.loads(raw.read_text())
    finally:
        if before is None:
            del os.environ["MALLOC_MMAP_THRESHOLD_"]
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = before
    data = measured["rounds"]
    return {"setup": {"model": f"LlamaForCausalLM hidden {hidden}, 4 layers, vocab 1024", "ranks": 2,
                      "backend": "gloo", "parameters": measured["parameters"], "trained": "all (full fine-tuning)",
                      "fp32_mb_model": round(measured["parameters"] * 4 / 2**20, 2), "rounds": rounds,
                      "torch": torch.__version__},
            "rank0": {v: {k: _summary([r[k] for r in data[v]]) for k in ("peak_mb", "tensor_mb", "seconds")}
                      for v in ("parts", "whole")},
            "ratio_whole_over_parts": {k: _summary([w[k] / p[k] for w, p in zip(data["whole"], data["parts"])])
                                       for k in ("peak_mb", "tensor_mb", "seconds")},
            "raw": data}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "checkpoint_shards.json"))
    args = parser.parse_args()
    report = run(args.rounds, args.hidden)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: report[k] for k in ("setup", "rank0", "ratio_whole_over_parts")}, indent=1))


if __name__ == "__main__":
    main()
