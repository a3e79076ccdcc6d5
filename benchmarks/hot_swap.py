"""Hot-swap: time to switch SmolLM2-135M's active randmask adapter (issue 25), free-function and PEFT paths.

    python benchmarks/hot_swap.py [--switches 300] [--json PATH]

Two adapters with random values are put on the model, then the active one is switched back and forth:
``randmask.set_adapter(model, name)`` (W0 written back at the old adapter's entries, W0 + values at the
new one's: O(nnz), no dense copy, no reload) and PEFT's ``model.set_adapter(name)`` on a randmask
``PeftModel`` (the same writes, made eagerly by the layer). Settings: ratio 1e-3 on q/v (~135k entries,
60 matrices) and ratio 1e-2 on all linear layers (~1.35M entries, 210 matrices), fp32. Reported per
setting: median and 10th/90th percentiles of the per-switch time (after 20 warm-up switches), and the
switch time relative to one 1-token decode forward of batch 1 (measured in the same rounds), so the
number reads on any machine, and the floor: the same random writes into one flat buffer with two ``scatter_``
calls (the memory cost of the writes, no per-matrix dispatch). Run it with background jobs paused.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import randmask  # noqa: E402
from randmask import MaskingConfig, apply_masking, atomic_write_bytes, default_targets, masked_layers  # noqa: E402
from randmask_lab.argtypes import positive_int

SETTINGS = {"qv@1e-3": (1e-3, "qv"), "all_linear@1e-2": (1e-2, "all_linear")}


def _fill(layers, name: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers:
            adapter = (layer.adapters if hasattr(layer, "adapters") else layer.randmask_adapters)[name]
            adapter.values.copy_(torch.randn(adapter.nnz, generator=gen) * 1e-2)


def _quantiles(xs: list[float]) -> dict[str, float]:
    q = statistics.quantiles(xs, n=10)
    return {"median_ms": 1e3 * statistics.median(xs), "p10_ms": 1e3 * q[0], "p90_ms": 1e3 * q[-1]}


def _time_switches(switch, names: list[str], n: int, warmup: int = 20) -> list[float]:
    times = []
    for i in range(n + warmup):
        name = names[i % 2]
        t0 = time.perf_counter()
        switch(name)
        dt = time.perf_counter() - t0
        if i >= warmup:
            times.append(dt)
    return times


def _decode_step_seconds(model, rounds: int = 20) -> float:
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        out = model(ids, use_cache=True)
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            model(torch.tensor([[4]]), past_key_values=out.past_key_values, use_cache=True)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_free(ratio: float, target_set: str, switches: int) -> dict:
    from randmask_lab.zoo import load_causal_lm

    model, _ = load_causal_lm("smollm2-135m", dtype=torch.float32)
    model.eval()
    targets = default_targets(model, target_set)
    for seed, name in enumerate(["a", "b"]):
        apply_masking(model, MaskingConfig(targets=targets, trainable_ratio=ratio, seed=seed), adapter_name=name)
    layers = list(masked_layers(model).values())
    for seed, name in enumerate(["a", "b"]):
        _fill(layers, name, seed)
    nnz = randmask.masking_summary(model, "a").trainable
    times = _time_switches(lambda n: randmask.set_adapter(model, n), ["a", "b"], switches)
    floor = _time_switches(_write_floor(layers, ["a", "b"]), ["a", "b"], switches)
    decode = _decode_step_seconds(model)
    return {"path": "free", "nnz": nnz, "matrices": len(layers), **_quantiles(times),
            "floor": _quantiles(floor), "switch_over_floor": statistics.median(times) / statistics.median(floor),
            "decode_step_ms": 1e3 * decode, "switch_over_decode_step": statistics.median(times) / decode}


def _write_floor(layers, names: list[str]):
    """The same writes with no per-matrix dispatch: one flat fp32 buffer the size of all adapted matrices, each
    adapter's entries at their offsets; a switch is two ``scatter_`` calls (old entries back, new ones written).
    What is left is the memory cost of the random writes themselves: the floor a switch cannot go under."""
    offsets, total = [], 0
    for layer in layers:
        offsets.append(total)
        total += layer.weight.numel()
    buffer = torch.zeros(total)
    flat = {n: torch.cat([layer.adapters[n].indices + off for layer, off in zip(layers, offsets)]) for n in names}
    entries = {n: torch.randn(flat[n].numel()) for n in names}
    state = {"active": names[0]}

    def switch(name: str) -> None:
        old = state["active"]
        buffer.scatter_(0, flat[old], entries[old])
        buffer.scatter_(0, flat[name], entries[name])
        state["active"] = name
    return switch


def bench_peft(ratio: float, target_set: str, switches: int) -> dict:
    from peft import get_peft_model

    from randmask.peft import RandMaskConfig, RandMaskLayer
    from randmask_lab.zoo import load_causal_lm

    model, _ = load_causal_lm("smollm2-135m", dtype=torch.float32)
    targets = default_targets(model, target_set)
    peft_model = get_peft_model(model, RandMaskConfig(target_modules=targets, trainable_ratio=ratio, seed=0),
                                adapter_name="a")
    peft_model.add_adapter("b", RandMaskConfig(target_modules=targets, trainable_ratio=ratio, seed=1))
    peft_model.eval()
    layers = [m for m in peft_model.modules() if isinstance(m, RandMaskLayer)]
    for seed, name in enumerate(["a", "b"]):
        _fill(layers, name, seed)
    times = _time_switches(peft_model.set_adapter, ["a", "b"], switches)
    return {"path": "peft", **_quantiles(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--switches", type=positive_int, default=300)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    from randmask_lab.machine import describe, machine_info

    torch.manual_seed(0)
    results = {"command": " ".join(["python", *sys.argv]), "machine": machine_info("cpu"),
               "threads": torch.get_num_threads(), "switches": args.switches,
               "settings": {}}
    print(describe(results["machine"]), f"threads={results['threads']}")
    for label, (ratio, target_set) in SETTINGS.items():
        rows = [bench_free(ratio, target_set, args.switches), bench_peft(ratio, target_set, args.switches)]
        results["settings"][label] = rows
        for row in rows:
            extra = (f"  nnz={row['nnz']:,} in {row['matrices']} matrices; the writes alone (one flat buffer) "
                     f"{row['floor']['median_ms']:.3f} ms (switch = {row['switch_over_floor']:.2f}x that); "
                     f"one decode step "
                     f"{row['decode_step_ms']:.1f} ms (switch = {row['switch_over_decode_step']:.3f} of it)"
                     if "nnz" in row else "")
            print(f"{label:<16} {row['path']:<5} switch median {row['median_ms']:.3f} ms "
                  f"(p10 {row['p10_ms']:.3f}, p90 {row['p90_ms']:.3f}){extra}")
    if args.json:
        atomic_write_bytes(args.json, (json.dumps(results, indent=1) + "\n").encode())


if __name__ == "__main__":
    main()
