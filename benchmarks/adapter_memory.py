"""Resident memory per served adapter: randmask's values, indices and serving caches against PEFT LoRA r=8.

    python benchmarks/adapter_memory.py [--shape opt-125m] [--adapters 32] [--batch 32] [--prompt-len 64]
                                        [--json PATH]

A PeftModel with ``--adapters`` randmask adapters at trainable_ratio 1e-3 on q/v (as ``benchmarks/mixed_batch.py``
builds it; random init at ``--shape``), served as ``generate`` serves it: a mixed batch of ``--batch`` prompts of
``--prompt-len`` tokens (a prefill; above ``randmask.mixed.GATHERED_MAX_ELEMENTS`` it runs one SpMM per adapter
group), then one decode step of 1 token per row (the gathered layout), ``torch.no_grad``. Then it counts the bytes
of every distinct tensor storage each part holds, per kept entry and per adapter:

    adapter      the adapters' parameters and buffers (values; indices; W0 at the kept entries, active adapter only)
    tables       each layer's gathered index tables and its kept stack of values (randmask.gathered)
    CSR layouts  each adapter's CSR of its delta, kept for the per-group SpMM (randmask.delta)

and PEFT LoRA r=8's adapter parameters, the same way (LoRA keeps no serving cache). Memory, not time: the numbers
do not depend on the machine's load.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from bench_machine import save_json  # noqa: E402
from bench_models import SHAPES, build_base  # noqa: E402
from mixed_batch import assignment, build  # noqa: E402
from randmask_lab.argtypes import positive_int  # noqa: E402


def storages(objects: list[object]) -> dict[int, int]:
    """data_ptr -> bytes of every tensor storage in ``objects`` (tensors, dataclasses, dicts, tuples, lists)."""
    found: dict[int, int] = {}

    def visit(obj: object) -> None:
        if isinstance(obj, torch.Tensor):
            if obj.numel():
                found[obj.untyped_storage().data_ptr()] = obj.untyped_storage().nbytes()
        elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            for f in dataclasses.fields(obj):
                visit(getattr(obj, f.name))
        elif isinstance(obj, dict):
            for value in obj.values():
                visit(value)
        elif isinstance(obj, (tuple, list)):
            for value in obj:
                visit(value)

    for obj in objects:
        visit(obj)
    return found


def adapter_tensors(model: torch.nn.Module, marker: str) -> list[torch.Tensor]:
    """Every parameter and buffer of the model whose name holds ``marker`` (the adapters')."""
    named = [*model.named_parameters(), *model.named_buffers()]
    return [t for name, t in named if marker in name]


def serve(model: torch.nn.Module, names: list[str], ids: torch.Tensor) -> None:
    """A prefill of the whole prompt, then one decode step, each a mixed batch (no KV cache: the shapes suffice)."""
    with torch.no_grad():
        model(input_ids=ids, adapter_names=names)
        model(input_ids=ids[:, -1:], adapter_names=names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="opt-125m")
    parser.add_argument("--adapters", type=positive_int, default=32)
    parser.add_argument("--batch", type=positive_int, default=32)
    parser.add_argument("--prompt-len", type=positive_int, default=64)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    from randmask import delta, gathered

    base = build_base(False, "fp32", shape=args.shape).eval()
    names = assignment(args.batch, args.adapters)
    ids = torch.randint(2, base.config.vocab_size, (args.batch, args.prompt_len),
                        generator=torch.Generator().manual_seed(0))
    randmask = build(copy.deepcopy(base), "randmask", args.adapters)
    serve(randmask, names, ids)
    entries = sum(t.numel() for n, t in randmask.named_parameters() if "randmask_adapters" in n)
    parts = {"adapter": storages(adapter_tensors(randmask, "randmask_adapters")),
             "tables": storages(list(gathered._LAYER_TABLES.values())),  # a probe of the caches: private names
             "CSR layouts": storages(list(delta._LAYOUTS.values()))}
    lora = build(copy.deepcopy(base), "lora", args.adapters)
    serve(lora, names, ids)
    lora_bytes = sum(storages(adapter_tensors(lora, "lora_")).values())
    result = {"command": " ".join(["python", *sys.argv]), "shape": args.shape, "adapters": args.adapters,
              "batch": args.batch, "prompt_len": args.prompt_len, "kept_entries": entries,
              "randmask_bytes": {part: sum(found.values()) for part, found in parts.items()},
              "lora_bytes": lora_bytes}
    total = sum(result["randmask_bytes"].values())
    print(f"shape={args.shape}, {args.adapters} adapters (randmask 1e-3 on q/v: {entries:,} kept entries; LoRA r=8 on "
          f"q/v), {args.batch} prompts of {args.prompt_len} tokens, then a decode step")
    for part, size in [*result["randmask_bytes"].items(), ("randmask, all", total)]:
        per_adapter = size / args.adapters / 2**20
        print(f"  {part:<14} {size / entries:6.1f} B per kept entry, {per_adapter:7.2f} MiB per adapter")
    print(f"  {'LoRA r=8':<14} {lora_bytes / args.adapters / 2**20:30.2f} MiB per adapter "
          f"(randmask / LoRA: {total / lora_bytes:.2f})")
    if args.json:
        save_json(args.json, result)


if __name__ == "__main__":
    main()
