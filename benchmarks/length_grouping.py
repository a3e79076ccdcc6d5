"""Padding and step time of an epoch in the plain shuffled order vs grouped by length (``--group-by-length``).

    python benchmarks/length_grouping.py [--task boolq] [--n-train 250] [--steps 32] [--repeats 2] [--threads 2]
        [--json benchmarks/results/length_grouping.json]

First, with the tokenizer only: the padded tokens of the study's epochs (the study's sample, order
seed and batch 8) over the real tokens, for both orders, per task. Then, unless ``--steps 0``, the
runner's own training step (``Trainer.step`` of randmask 1e-3, prompts cut at 512 tokens, as the study
runs it; bf16-mixed where this CPU has native bf16, else 32: ``--precision`` picks) on the first
``--steps`` batches of epoch 1 in each order, interleaved: round r
times plain batch r and grouped batch r back to back, first in turn. The batches differ, so a round's
ratio means little; the epoch's does: reported is sum(plain) / sum(grouped) per pass over the steps
(``--repeats``: the spread between passes is the timing noise), and for all passes pooled a bootstrap
95% CI over rounds (the spread from which batches an epoch happens to hold).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from precision_step import build
from randmask_lab.argtypes import non_negative_int, positive_int
from randmask_lab.machine import bf16_native, describe, machine_info

MAX_LENGTH = 512  # the study's prompts are cut here (experiments/smollm2_study.json)

warnings.filterwarnings("ignore")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def padded_over_real(lengths: list[int], batches: list[list[int]]) -> float:
    """Tokens a step computes (each batch padded to its longest) over the real tokens."""
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    return padded / sum(lengths[i] for b in batches for i in b)


def epoch_batches(lengths: list[int], order_seed: int, epoch: int, batch: int, grouped: bool) -> list[list[int]]:
    """The runner's batches of one epoch (one process), plain or grouped by length."""
    from randmask_lab.experiment.parts.data import epoch_batches as runner_batches

    return runner_batches(len(lengths), order_seed, epoch, batch, lengths=lengths if grouped else None)


def padding_table(model: str, protocol: dict[str, int], epochs: int, batch: int, seed: int) -> list[dict]:
    """Per task: median prompt length and padded/real tokens over ``epochs`` epochs, both orders."""
    from transformers import AutoTokenizer

    from randmask_lab.experiment import RunConfig
    from randmask_lab.experiment.parts.assemble import check_names, encode, sample_splits
    from randmask_lab.experiment.parts.data import item_length
    from randmask_lab.zoo import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(model))
    rows = []
    for task, n_train in protocol.items():
        config = RunConfig(model=model, task=task, n_train=n_train, n_val=1, n_test=0, mode="lm", seed=seed,
                           max_length=MAX_LENGTH)
        spec = check_names(config)
        lengths = [item_length(x) for x in encode(config, spec, "lm", tokenizer, sample_splits(config, spec).train)]
        ratio = {g: statistics.mean(padded_over_real(lengths, epoch_batches(lengths, seed, e, batch, g))
                                    for e in range(epochs)) for g in (False, True)}
        rows.append({"task": task, "n_train": n_train, "median_tokens": statistics.median(lengths),
                     "plain": round(ratio[False], 3), "grouped": round(ratio[True], 3)})
    return rows


def epoch_ratio(plain: list[float], grouped: list[float], n_boot: int = 4000, seed: int = 0) -> dict:
    """sum(plain) / sum(grouped) and its percentile-bootstrap 95% CI (rounds resampled in pairs)."""
    p, g = torch.tensor(plain, dtype=torch.float64), torch.tensor(grouped, dtype=torch.float64)
    idx = torch.randint(0, len(p), (n_boot, len(p)), generator=torch.Generator().manual_seed(seed))
    boot = p[idx].sum(1) / g[idx].sum(1)
    low, high = torch.quantile(boot, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"speedup": round(float(p.sum() / g.sum()), 3), "ci95": [round(low, 3), round(high, 3)],
            "rounds": len(p)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="model (short name or folder)")
    parser.add_argument("--task", default="boolq", help="task whose epoch is timed")
    parser.add_argument("--n-train", type=positive_int, default=250, help="training examples of the timed task")
    parser.add_argument("--steps", type=non_negative_int, default=32, help="timed rounds (0: padding table only)")
    parser.add_argument("--repeats", type=positive_int, default=2, help="passes over the timed steps")
    parser.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads")
    parser.add_argument("--precision", choices=["32", "bf16-mixed"], default=None,
                        help="precision of the timed steps (default: bf16-mixed where bf16 is native, else 32)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    precision = args.precision or ("bf16-mixed" if bf16_native("cpu") else "32")
    torch.set_num_threads(args.threads)
    protocol = {"sst2": 500, "rte": 250, "cb": 200, "boolq": 250}  # experiments/smollm2_study.json
    protocol[args.task] = args.n_train
    rows = padding_table(args.model, protocol, epochs=3, batch=8, seed=0)
    print(f"{args.model}, batch 8, 3 epochs, seed 0: tokens computed / real tokens")
    print("| task | n_train | median tokens | plain order | grouped by length |\n|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['task']} | {r['n_train']} | {r['median_tokens']:g} | {r['plain']:.2f}x | {r['grouped']:.2f}x |")
    result = {"command": " ".join(["python", *sys.argv]), "torch": torch.__version__, "machine": machine_info(),
              "padding": rows}
    if args.steps > 0:
        with tempfile.TemporaryDirectory() as tmp:
            trainer, _, _ = build(precision, "auto", args.model, args.task, args.n_train, Path(tmp), MAX_LENGTH)
            from randmask_lab.experiment.parts.data import item_length

            lengths = [item_length(x) for x in trainer.data.train]
            batches = {g: epoch_batches(lengths, 0, 0, 8, g)[: args.steps] for g in (False, True)}
            # Warm-up on the widest batch: the first step at a new largest shape pays for growing the
            # allocator's pools (2x a later step of that shape), which would land on whichever order meets it first.
            trainer.step(max(batches[False], key=lambda b: max(lengths[i] for i in b)))
            times: dict[bool, list[float]] = {False: [], True: []}
            passes = []
            for _ in range(args.repeats):
                done = len(times[False])
                for r in range(min(len(batches[False]), len(batches[True]))):
                    for g in ((False, True) if r % 2 == 0 else (True, False)):
                        start = time.perf_counter()
                        trainer.step(batches[g][r])
                        times[g].append(time.perf_counter() - start)
                passes.append(round(sum(times[False][done:]) / sum(times[True][done:]), 3))
        timing = epoch_ratio(times[False], times[True])
        print(f"\n{args.task}, randmask 1e-3, {precision}, {args.threads} threads, on {describe()}, "
              f"first {len(batches[False])} steps "
              f"of epoch 1, {args.repeats} passes: plain / grouped time {', '.join(f'{p:.2f}x' for p in passes)}; "
              f"pooled {timing['speedup']:.2f}x (bootstrap 95% CI over rounds {timing['ci95'][0]:.2f}-"
              f"{timing['ci95'][1]:.2f})")
        result["timing"] = {**timing, "passes": passes, "task": args.task, "precision": precision,
                            "plain_s": times[False],
                            "grouped_s": times[True]}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
