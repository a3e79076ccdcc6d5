"""Mixed-batch generation throughput: randmask vs PEFT LoRA, one adapter per request (issue 25).

    python benchmarks/mixed_batch.py [--adapters 8 32] [--rounds 3] [--batch 32] [--prompt-len 16]
                                     [--new-tokens 32] [--json PATH]

SmolLM2-135M on CPU in fp32 (this CPU has no native bf16: a bf16 matmul runs tens of times slower than fp32, so bf16
would measure the emulation, not the adapters). A batch of --batch prompts of --prompt-len tokens, each
request assigned one of N distinct adapters (a seeded shuffle, every adapter equally often), greedy
``generate`` of exactly --new-tokens tokens (prefill + decode steps, KV cache). Variants, each a separate
model built once:

    base      the plain model (no adapters): the ceiling
    randmask  a randmask PeftModel with N adapters at ratio 1e-3 on q/v, ``adapter_names=[...]`` (the
              kernel randmask.mixed picks per call)
    per_group the same model with one ``sparse_delta`` SpMM per adapter group forced (--kernels only)
    lora      a PEFT LoRA PeftModel with N adapters r=8, alpha=16 on q/v, ``adapter_names=[...]``

Adapter values are random (B != 0 for LoRA), so every delta is computed. Per round every variant runs
once, back to back (order reversed every other round); per round we take throughput ratios
(randmask / base, lora / base, randmask / lora) and report their median and min-max over rounds. Before
timing, a correctness check on the real model: a mixed-batch forward of --check prompts against each
prompt run alone with its adapter set (max |difference| of the logits, and relative to the largest logit:
randmask's mixed path adds W0 x + D x where the prompt alone runs (W0 + D) x, so fp32 rounding differs).
Run it with background jobs paused: every variant gets one untimed full-size generate first.

Duration on the 2-core AVX2 CPU, quiet, --threads 2: one generate of the default batch takes ~9 s, so one
adapter count takes ~3-4 minutes at 5 rounds. Where other processes share the cores, pass --threads 1: two
OpenMP threads on two busy cores stall each other (a 32-prompt generate ran >4 minutes).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from randmask import atomic_write_bytes, default_targets  # noqa: E402
from randmask_lab.argtypes import positive_int  # noqa: E402


def _randomize(model, seed: int) -> None:
    """Random values for every adapter tensor (randmask values, LoRA A and B)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".randmask_adapters." in name or ".lora_A." in name or ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 1e-2)


def build(base, kind: str, n_adapters: int):
    """A PeftModel of ``kind`` with adapters a0..a{n-1}."""
    from peft import LoraConfig, get_peft_model

    from randmask.peft import RandMaskConfig

    model = copy.deepcopy(base)
    targets = default_targets(model, "qv")
    def config(i: int):
        if kind == "lora":
            return LoraConfig(r=8, lora_alpha=16, target_modules=targets, lora_dropout=0.0)
        return RandMaskConfig(target_modules=targets, trainable_ratio=1e-3, seed=i)
    peft_model = get_peft_model(model, config(0), adapter_name="a0")
    for i in range(1, n_adapters):
        peft_model.add_adapter(f"a{i}", config(i))
    _randomize(peft_model, seed=n_adapters)
    return peft_model.eval()


def assignment(batch: int, n_adapters: int, seed: int = 0) -> list[str]:
    """Each of n adapters equally often over the batch, in a seeded shuffled order (requests arrive mixed)."""
    names = [f"a{i % n_adapters}" for i in range(batch)]
    order = torch.randperm(batch, generator=torch.Generator().manual_seed(seed)).tolist()
    return [names[i] for i in order]


def check(model, ids: torch.Tensor, names: list[str]) -> dict[str, float]:
    """max |mixed-batch logits - each prompt alone with its adapter set|, and max |logit| for scale."""
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
        alone = []
        for i, name in enumerate(names):
            model.set_adapter(name)
            alone.append(model(input_ids=ids[i:i + 1]).logits)
    alone = torch.cat(alone)
    diff, scale = float((mixed - alone).abs().max()), float(alone.abs().max())
    return {"max_abs_diff": diff, "max_abs_logit": scale, "relative": diff / scale}


def generate_seconds(model, ids: torch.Tensor, names: list[str] | None, new_tokens: int,
                     per_group: bool = False) -> float:
    from randmask import mixed

    limit = mixed.GATHERED_MAX_ELEMENTS
    mixed.GATHERED_MAX_ELEMENTS = -1 if per_group else limit
    try:
        return _generate_seconds(model, ids, names, new_tokens)
    finally:
        mixed.GATHERED_MAX_ELEMENTS = limit


def _generate_seconds(model, ids: torch.Tensor, names: list[str] | None, new_tokens: int) -> float:
    kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False, "pad_token_id": 0}
    if names is not None:
        kwargs["adapter_names"] = names
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    seconds = time.perf_counter() - t0
    assert out.shape[1] == ids.shape[1] + new_tokens
    return seconds


def run(base, n_adapters: int, args) -> dict:
    ids = torch.randint(100, 40000, (args.batch, args.prompt_len), generator=torch.Generator().manual_seed(1))
    names = assignment(args.batch, n_adapters)
    randmask_model = build(base, "randmask", n_adapters)
    variants = {"base": (base, None), "randmask": (randmask_model, names),
                "lora": (build(base, "lora", n_adapters), names)}
    if args.kernels:
        variants["per_group"] = (randmask_model, names)
    print(f"  {n_adapters} adapters: models built", flush=True)
    errors = {k: check(variants[k][0], ids[:args.check], names[:args.check]) for k in ("randmask", "lora")}
    for key, (model, n) in variants.items():  # warm-up at full size: the first generate of a shape runs slower
        generate_seconds(model, ids, n, args.new_tokens, per_group=key == "per_group")
    seconds: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(args.rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for key in order:
            model, n = variants[key]
            seconds[key].append(generate_seconds(model, ids, n, args.new_tokens, per_group=key == "per_group"))
            print(f"  {n_adapters} adapters, round {r + 1}: {key} {seconds[key][-1]:.1f} s", flush=True)
    tokens = args.batch * args.new_tokens
    def ratios(num: str, den: str) -> dict:  # throughput num / den per round = time den / time num
        rs = [d / n for n, d in zip(seconds[num], seconds[den])]
        return {"median": statistics.median(rs), "min": min(rs), "max": max(rs)}
    return {"adapters": n_adapters, "tokens_per_s": {k: tokens / statistics.median(v) for k, v in seconds.items()},
            "seconds": seconds, "randmask_over_base": ratios("randmask", "base"),
            "lora_over_base": ratios("lora", "base"), "randmask_over_lora": ratios("randmask", "lora"),
            **({"per_group_over_lora": ratios("per_group", "lora")} if args.kernels else {}),
            "max_abs_error_vs_alone": errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", type=positive_int, nargs="+", default=[8, 32])
    parser.add_argument("--rounds", type=positive_int, default=3)
    parser.add_argument("--batch", type=positive_int, default=32)
    parser.add_argument("--prompt-len", type=positive_int, default=16)
    parser.add_argument("--new-tokens", type=positive_int, default=32)
    parser.add_argument("--check", type=positive_int, default=4, help="prompts in the correctness check")
    parser.add_argument("--kernels", action="store_true", help="also time one SpMM per group (per_group)")
    parser.add_argument("--threads", type=positive_int, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    import randmask.peft  # noqa: F401  (registers the PEFT method)
    from randmask_lab.machine import describe, machine_info
    from randmask_lab.zoo import load_causal_lm

    if args.threads:
        torch.set_num_threads(args.threads)
    base, _ = load_causal_lm("smollm2-135m", dtype=torch.float32)
    base.eval()
    result = {"command": " ".join(["python", *sys.argv]), "machine": machine_info("cpu"),
              "threads": torch.get_num_threads(), "dtype": "float32",
              "batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
              "rounds": args.rounds, "runs": []}
    print(describe(result["machine"]), f"threads={result['threads']}, fp32, batch {args.batch} x "
          f"{args.prompt_len} prompt tokens, {args.new_tokens} new tokens, {args.rounds} rounds")
    for n in args.adapters:
        row = run(base, n, args)
        result["runs"].append(row)
        if args.json:  # after each adapter count: a run stopped later keeps what it measured
            atomic_write_bytes(args.json, (json.dumps(result, indent=1) + "\n").encode())
        tps = row["tokens_per_s"]
        fmt = lambda r: f"{r['median']:.3f} ({r['min']:.3f}-{r['max']:.3f})"  # noqa: E731
        print(f"{n:>3} adapters: tokens/s base {tps['base']:.1f}, randmask {tps['randmask']:.1f}, "
              f"lora {tps['lora']:.1f} | randmask/base {fmt(row['randmask_over_base'])}, "
              f"lora/base {fmt(row['lora_over_base'])}, "
              f"randmask/lora {fmt(row['randmask_over_lora'])}"
              + (f", per_group/lora {fmt(row['per_group_over_lora'])}" if args.kernels else "")
              + " | max |mixed - alone| "
              + ", ".join(f"{k} {v['max_abs_diff']:.2e} (logits up to {v['max_abs_logit']:.1f}: relative "
                          f"{v['relative']:.1e})"
                          for k, v in row["max_abs_error_vs_alone"].items()))


if __name__ == "__main__":
    main()
