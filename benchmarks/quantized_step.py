"""SmolLM2-135M on a quantized base: randmask vs QLoRA vs SHiRA, step time (paired rounds) and peak memory.

    python benchmarks/quantized_step.py [--quantize nf4] [--rounds 5] [--json PATH]

Variants (the runner's own training step: SST-2 in LM mode, the first 8 training prompts of data seed 0,
LMObjective's loss, AdamW): randmask at 1e-3 of all parameters on the quantized base, randmask 1e-3 on
the float base, PEFT LoRA r=8 (alpha 16, q/v) on the quantized base (QLoRA), PEFT SHiRA r=8 (q/v) on
the quantized base. Compute is fp32: this CPU has no native bf16 (a bf16 matmul runs tens of times slower than
fp32 here), so the issue's bf16 compute would measure the emulation, not the methods.

Timing: all variants in this one process, one step each per round, the order reversed every other
round; each round gives each variant's ratio to QLoRA's step in that round; median and bootstrap 95% CI.
Memory: each variant in a fresh subprocess: peak resident set over 2 steps (VmHWM, reset after the
load), total and above the load.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
import warnings
from pathlib import Path

import torch

from bench_machine import save_json
from bench_stats import interleaved, paired_ratios, summarize, timed
from randmask_lab.argtypes import non_negative_int, positive_int
from randmask_lab.machine import describe, machine_info

warnings.filterwarnings("ignore")
VARIANTS = ("randmask 1e-3 {q}", "randmask 1e-3 float", "qlora r=8 {q}", "shira r=8 {q}")
REFERENCE = "qlora r=8 {q}"


def build(variant: str, quantize: str):
    """(model, train step, optimizer) of one variant, through the runner's own pieces."""
    from peft import ShiraConfig, get_peft_model

    from randmask_lab.experiment import RunConfig
    from randmask_lab.experiment.parts.assemble import check_names, load_data, load_model, make_objective, prepare

    q = "none" if variant.endswith("float") else quantize
    method = "randmask" if variant.startswith("randmask") else "lora" if variant.startswith("qlora") else "zeroshot"
    config = RunConfig(model="smollm2-135m", task="sst2", mode="lm", method=method, n_train=500, n_val=250,
                       n_test=500, max_length=512, quantize=q, **({} if method == "zeroshot" else {"lr": 1e-2}))
    spec = check_names(config)
    model, tokenizer = load_model(config, spec, "lm", device=torch.device("cpu"))
    data = load_data(config, spec, "lm", tokenizer)
    objective = make_objective(config, data, tokenizer)
    if variant.startswith("shira"):  # not a runner method: PEFT's SHiRA on the same q/v
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = get_peft_model(model, ShiraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    else:
        model = prepare(config, model, total_steps=100).model
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    batch = data.train[:8]

    def step() -> None:
        objective.loss(model, batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, step, sum(p.numel() for p in params)


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure_memory(variant: str, quantize: str) -> dict:
    """In this (fresh) process: RSS after load, then the peak over 2 steps (the first makes AdamW's state)."""
    _, step, trainable = build(variant, quantize)
    gc.collect()
    load_kb = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    for _ in range(2):
        step()
    peak_kb = _status_kb("VmHWM")
    return {"variant": variant, "trainable": trainable, "load_rss_mb": round(load_kb / 1024, 1),
            "peak_rss_total_mb": round(peak_kb / 1024, 1), "peak_rss_mb": round((peak_kb - load_kb) / 1024, 1),
            "maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def time_variants(names: list[str], quantize: str, rounds: int, warmup: int, log) -> dict[str, list[float]]:
    steps = {}
    for name in names:
        log(f"building {name}")
        steps[name] = build(name, quantize)[1]
    return interleaved({name: timed(step) for name, step in steps.items()}, rounds, warmup,
                       on_round=lambda r, times: log(f"round {r + 1}: "
                                                     + ", ".join(f"{n} {times[n][-1]:.2f} s" for n in names)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quantize", default="nf4", choices=("nf4", "fp4", "int8", "ao-int8", "ao-nf4"))
    parser.add_argument("--rounds", type=positive_int, default=5)
    parser.add_argument("--warmup", type=non_negative_int, default=1)
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)  # the subprocess's own job
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_of:
        print(json.dumps(measure_memory(args.memory_of, args.quantize)))
        return 0
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    names = [v.format(q=args.quantize) for v in VARIANTS]
    if args.quantize == "ao-nf4":  # PEFT's SHiRA forward re-quantizes W0 + delta into an NF4Tensor with torchao's
        names.remove("shira r=8 ao-nf4")  # default blocks, which SmolLM2's 5184 blocks per q/v do not fit: it fails
        log("shira r=8 ao-nf4: left out (PEFT's SHiRA re-quantizes through NF4Tensor's default blocks and fails)")
    reference = REFERENCE.format(q=args.quantize)
    times = time_variants(names, args.quantize, args.rounds, args.warmup, log)
    rows = []
    for name in names:
        s = summarize(paired_ratios(times[name], times[reference]))
        rows.append({"variant": name, "ratio_to_qlora": round(s.median, 4), "ci_low": round(s.ci_low, 4),
                     "ci_high": round(s.ci_high, 4), "rounds": s.rounds,
                     "step_s_median": round(sorted(times[name])[len(times[name]) // 2], 3)})
    if not args.no_memory:
        for row in rows:
            log(f"memory: {row['variant']}")
            cmd = [sys.executable, str(Path(__file__).resolve()), "--quantize", args.quantize, "--threads",
                   str(args.threads), "--memory-of", row["variant"]]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"on {describe()}, {args.threads} threads\n")
    print("| variant | step time / QLoRA's [95% CI] | peak RSS MB (above load) | trainable |")
    print("|---|---:|---:|---:|")
    for r in rows:
        mem = f"{r['peak_rss_total_mb']:.0f} ({r['peak_rss_mb']:.0f})" if "peak_rss_total_mb" in r else ""
        print(f"| {r['variant']} | {r['ratio_to_qlora']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}] | {mem} | "
              f"{r.get('trainable', '')} |")
    if args.json:
        payload = {"settings": {"quantize": args.quantize, "rounds": args.rounds, "warmup": args.warmup,
                                "threads": args.threads, "torch": torch.__version__, "machine": machine_info(),
                                "command": "python benchmarks/quantized_step.py " + " ".join(argv or sys.argv[1:])},
                   "rows": rows}
        save_json(args.json, payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
