"""Training-step time of causal-LM scoring: LM-head logits at the scored positions only vs everywhere.

    python benchmarks/logits_positions.py [--rounds 5] [--batch 8] [--json PATH]

SmolLM2-135M (the offline GGUF, converted once), randmask at 0.01% on q/v, a batch of real RTE
prompts (candidates " Yes"/" No", one token each), candidate cross-entropy loss, AdamW step.
Variants, timed round-robin in one process so machine drift hits all alike (only ratios count):

- ``positions_only``: the runner's path. One pass over each context scores both one-token
  candidates; the LM head (49,152 x 576) runs only at the scored positions.
- ``full_logits``: same sequences, vocabulary logits at every position, then gathered.
- ``per_candidate_full``: MeZO's way: one sequence per candidate, full logits.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from bench_stats import interleaved, timed
from randmask_lab.argtypes import positive_int
from randmask_lab.machine import describe, machine_info

warnings.filterwarnings("ignore")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def build(batch: int):
    from transformers.utils import logging as hf_logging

    from randmask_lab.experiment import RunConfig
    from randmask_lab.experiment.parts.assemble import check_names, load_data, load_model, prepare

    hf_logging.disable_progress_bar()

    config = RunConfig(model="smollm2-135m", task="rte", method="randmask", trainable_ratio=1e-4, n_train=batch,
                       n_val=1, n_test=0)
    spec = check_names(config)
    model, tokenizer = load_model(config, spec, "lm")
    items = load_data(config, spec, "lm", tokenizer).train
    prepared = prepare(config, model, total_steps=100)
    prepared.model.train()
    optimizer = torch.optim.AdamW(prepared.trainable_parameters(), lr=1e-3)
    return prepared.model, optimizer, items, tokenizer.pad_token_id


def step_fn(variant: str, model, optimizer, items, pad_id: int):
    from randmask_lab.experiment.parts.lm import Span, candidate_scores, span_logprobs

    golds = torch.tensor([x.gold for x in items])

    def per_candidate() -> torch.Tensor:
        seqs = [x.context + c for x in items for c in x.candidates]
        spans = [Span(i, len(items[i // 2].context), seqs[i][len(items[i // 2].context):]) for i in range(len(seqs))]
        return span_logprobs(model, seqs, spans, pad_id, positions_only=False).view(len(items), 2)

    def step() -> None:
        if variant == "per_candidate_full":
            scores = per_candidate()
        else:
            scores = candidate_scores(model, items, pad_id, positions_only=variant == "positions_only")
        F.cross_entropy(scores, golds).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=positive_int, default=5, help="timed rounds (one step per variant each)")
    parser.add_argument("--batch", type=positive_int, default=8, help="RTE prompts per step")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    model, optimizer, items, pad_id = build(args.batch)
    tokens = [len(x.context) + 1 for x in items]
    variants = ["positions_only", "full_logits", "per_candidate_full"]
    steps = {v: step_fn(v, model, optimizer, items, pad_id) for v in variants}
    times = interleaved({v: timed(steps[v]) for v in variants}, args.rounds, warmup=1)
    median = {v: statistics.median(ts) for v, ts in times.items()}
    result = {
        "machine": machine_info(),
        "model": "smollm2-135m", "task": "rte", "batch": args.batch, "rounds": args.rounds,
        "tokens_per_prompt_mean": statistics.fmean(tokens), "scored_positions_per_prompt": 1,
        "threads": torch.get_num_threads(),
        "step_s_median": median,
        "speedup_positions_only_vs_full_logits": median["full_logits"] / median["positions_only"],
        "speedup_positions_only_vs_per_candidate_full": median["per_candidate_full"] / median["positions_only"],
    }
    print(f"RTE prompts: {statistics.fmean(tokens):.0f} tokens on average, batch {args.batch}, "
          f"{args.rounds} rounds, {torch.get_num_threads()} threads, on {describe(result['machine'])}")
    for v in variants:
        print(f"  {v:<20} {median[v] / median['positions_only']:.2f}x the positions-only step time")
    print(f"positions-only logits: {result['speedup_positions_only_vs_full_logits']:.2f}x faster than full "
          f"logits; {result['speedup_positions_only_vs_per_candidate_full']:.2f}x faster than one full-logits "
          "pass per candidate")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
