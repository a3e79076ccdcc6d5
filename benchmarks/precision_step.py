"""bf16 vs fp32 training-step time of the runner on SmolLM2-135M RTE prompts, side by side in one process.

    python benchmarks/precision_step.py [--rounds 20] [--threads 2] [--json benchmarks/results/precision_step.json]

Each variant is the runner's own step (``Trainer.step``: forward under the precision's autocast and
attention backend, backward, AdamW step) of randmask at ratio 1e-3 on the same 8 RTE prompts
(SmolLM2's tokenizer, max length 1024). Variants are built first and timed round-robin, one step each per
round in a rotating order, so machine drift hits every variant alike; reported: the median time per
variant, and the median of the per-round ratios 32 / variant with a bootstrap 95% CI.

Variants: ``32``; ``bf16-mixed`` and ``bf16-true`` as the runner picks them (the folded attention kernel of
``randmask_lab.experiment.compute.attention`` on CPU); and ``bf16-true`` with SDPA's math backend and with PyTorch's
default SDPA kernel, to show why the runner picks the folded kernel.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from bench_stats import summarize
from randmask_lab.argtypes import non_negative_int, positive_int
from randmask_lab.machine import bf16_native, describe, machine_info

warnings.filterwarnings("ignore")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def build(name: str, attention: str, model_name: str, task: str, n: int, workdir: Path, max_length: int = 1024):
    """A Trainer for one precision variant and the indices of its one batch (prompts cut at ``max_length``)."""
    from randmask_lab.experiment import RunConfig
    from randmask_lab.experiment.compute.distributed import DistContext
    from randmask_lab.experiment.compute.precision import PrecisionPlan
    from randmask_lab.experiment.parts.assemble import assemble
    from randmask_lab.experiment.training.loop import Trainer

    config = RunConfig(model=model_name, task=task, method="randmask", trainable_ratio=1e-3, lr=1e-3, n_train=n,
                       n_val=1, n_test=0, batch_size=n, epochs=1, precision=name, progress=False, checkpoint_every=-1,
                       out_dir=str(workdir), max_length=max_length)
    parts = assemble(config, plan=PrecisionPlan(name, torch.device("cpu"), attention), total_steps=10)
    trainer = Trainer(parts, DistContext(), workdir / f"{name}-{attention}")
    return trainer, list(range(len(parts.data.train))), parts.attention


def summary(times: dict[tuple[str, str], list[float]], attention: dict[tuple[str, str], str]) -> list[dict]:
    """Per variant: median step time, median per-round speed-up over 32, its bootstrap 95% CI (the step
    benchmark's ``bench_stats.summarize``)."""
    base = times[("32", "auto")]
    rows = []
    for v, ts in times.items():
        speedup = summarize([b / t for b, t in zip(base, ts)])  # per round: fp32 time / variant time
        rows.append({"precision": v[0], "attention": attention[v],
                     "median_s": round(statistics.median(ts), 4), "speedup_vs_32": round(speedup.median, 3),
                     "ci95": [round(speedup.ci_low, 3), round(speedup.ci_high, 3)], "rounds": len(ts)})
    return rows


def resummarize(path: Path) -> tuple[dict, list[dict]]:
    """(meta, rows) recomputed from a saved JSON's per-round times, without timing anything again."""
    saved = json.loads(path.read_text())
    keys = [tuple(k.split("/")) for k in saved["times"]]
    attention = {k: row["attention"] for k, row in zip(keys, saved["rows"])}  # rows follow the times' order
    return saved["meta"], summary({k: saved["times"]["/".join(k)] for k in keys}, attention)


def table(rows: list[dict]) -> str:
    lines = ["| precision | attention | median step (s) | speed-up vs 32 | 95% CI |", "|---|---|---:|---:|---|"]
    lines += [f"| {r['precision']} | {r['attention']} | {r['median_s']:.2f} | {r['speedup_vs_32']:.2f}x | "
              f"{r['ci95'][0]:.2f}-{r['ci95'][1]:.2f} |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=positive_int, default=20, help="timed rounds (one step per variant each)")
    parser.add_argument("--warmup", type=non_negative_int, default=2, help="untimed rounds first")
    parser.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads")
    parser.add_argument("--model", default="smollm2-135m", help="model (short name or folder)")
    parser.add_argument("--task", default="rte", help="task whose prompts form the batch")
    parser.add_argument("--batch", type=positive_int, default=8, help="prompts per step")
    parser.add_argument("--variants", nargs="+",
                        default=["32", "bf16-mixed", "bf16-true", "bf16-true:math", "bf16-true:default"],
                        help="PRECISION[:auto|folded|math|default] to time (32 always included)")
    parser.add_argument("--json", type=Path, help="write the results here (rewritten after every round)")
    parser.add_argument("--summarize", type=Path, metavar="JSON",
                        help="print the table of a saved run from its per-round times (times nothing); "
                             "with --json, rewrite its rows there")
    args = parser.parse_args()
    if args.summarize:
        try:
            meta, rows = resummarize(args.summarize)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:  # json errors are ValueErrors
            parser.error(f"--summarize {args.summarize}: not a saved precision_step run ({type(e).__name__}: {e})")
        print(f"{meta['command']}: {meta['model']}, {meta['task']}, batch {meta['batch']}, {meta['threads']} threads, "
              f"on {describe(meta['machine']) if 'machine' in meta else 'a CPU it did not record'}")
        print(table(rows))
        if args.json:
            saved = json.loads(args.summarize.read_text())
            args.json.write_text(json.dumps({**saved, "rows": rows}, indent=1) + "\n")
            print(f"wrote {args.json}")
        return
    torch.set_num_threads(args.threads)
    variants = [tuple((v + ":auto").split(":")[:2]) for v in args.variants]
    variants = [("32", "auto")] + [v for v in variants if v != ("32", "auto")]
    meta = {"model": args.model, "task": args.task, "batch": args.batch, "threads": args.threads,
            "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
            "machine": machine_info(), "command": " ".join(["python", *sys.argv])}
    print(f"on {describe(meta['machine'])}", flush=True)
    if not bf16_native("cpu") and any(v[0].startswith("bf16") for v in variants):
        print("warning: this CPU has no native bf16 (no AMX or avx512_bf16): its bf16 steps run many times slower "
              "than fp32, so this takes hours (--variants with fewer bf16 ones is shorter)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        built = {v: build(*v, args.model, args.task, args.batch, Path(tmp)) for v in variants}
        meta["context_tokens"] = sum(len(x.context) for x in built[variants[0]][0].data.train)
        attention = {v: built[v][2] for v in variants}
        times: dict[tuple[str, str], list[float]] = {v: [] for v in variants}
        for r in range(args.warmup + args.rounds):
            order = variants[r % len(variants):] + variants[:r % len(variants)]  # rotate who goes first
            for v in order:
                trainer, batch, _ = built[v]
                start = time.perf_counter()
                trainer.step(batch)
                if r >= args.warmup:
                    times[v].append(time.perf_counter() - start)
            if r < args.warmup:
                continue
            print(f"round {r - args.warmup + 1}/{args.rounds}: "
                  + ", ".join(f"{a}/{b} {times[(a, b)][-1]:.2f} s" for a, b in variants), flush=True)
            if args.json:  # every round, so an interrupted benchmark still leaves its numbers
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps({"meta": meta, "rows": summary(times, attention), "times": {
                    f"{a}/{b}": t for (a, b), t in times.items()}}, indent=1) + "\n")
    print(f"\n{args.model}, {args.task}, batch {args.batch} ({meta['context_tokens']} context tokens), randmask 1e-3, "
          f"{args.threads} threads, {args.rounds} rounds, on {describe(meta['machine'])}; median step time and "
          "speed-up over 32 (bootstrap 95% CI):")
    print(table(summary(times, attention)))
    if args.json:
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
