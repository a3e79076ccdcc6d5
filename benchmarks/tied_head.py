"""What masking a tied LM head costs: its delta beside the shared weight, against an untied copy masked in place.

    python benchmarks/tied_head.py [--quick] [--rounds 12] [--json PATH]

OPT-125m's shapes (random init; its ``lm_head`` is the input embedding, tied), batch 8 x 128, fp32, one AdamW step
of the causal-LM loss. Variants, each built in this one process and stepped round-robin (benchmarks/bench_stats):

- ``q/v``: randmask on q/v only, the reference of every ratio;
- ``q/v + tied lm_head``: q/v and the tied head, whose delta goes beside the shared weight (``randmask.paths``);
- ``q/v + untied lm_head``: the same numbers with ``lm_head`` holding its own copy of the weight, masked in place
  (what an untied model pays; on a tied model the in-place write would change the embedding too).

Each target gets the same per-matrix density (``--density``, default 1e-3), so both lm_head variants train the
same entries. Reported: the median per-round step-time ratio to ``q/v`` with a bootstrap 95% CI. Run it with
background jobs paused.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from bench_models import batch_ids, build_base, make_step  # noqa: E402
from bench_stats import interleaved, paired_ratios, summarize, timed  # noqa: E402
from randmask import MaskingConfig, apply_masking, atomic_write_bytes, masked_layers  # noqa: E402

QV = ["q_proj", "v_proj"]


def variants(base: torch.nn.Module, density: float) -> dict[str, torch.nn.Module]:
    """The three models (deep copies of ``base``, whose lm_head must be tied to its input embedding)."""
    if base.lm_head.weight is not base.get_input_embeddings().weight:
        raise ValueError("the benchmark's base must have a tied lm_head")
    untied = copy.deepcopy(base)
    untied.lm_head.weight = torch.nn.Parameter(untied.lm_head.weight.detach().clone())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the tie warning: expected here
        models = {
            "q/v": apply_masking(copy.deepcopy(base), MaskingConfig(targets=QV, density=density, seed=0)),
            "q/v + tied lm_head": apply_masking(copy.deepcopy(base),
                                                MaskingConfig(targets=[*QV, "lm_head"], density=density, seed=0)),
            "q/v + untied lm_head": apply_masking(untied,
                                                  MaskingConfig(targets=[*QV, "lm_head"], density=density, seed=0)),
        }
    assert masked_layers(models["q/v + tied lm_head"])["lm_head"].delta_path
    assert not masked_layers(models["q/v + untied lm_head"])["lm_head"].delta_path
    return models


def run(quick: bool, rounds: int, warmup: int, density: float) -> dict:
    """Time the variants; the ratios to ``q/v`` with their CIs, and each variant's median step seconds."""
    base = build_base(quick, "fp32")
    ids = batch_ids(base, quick)
    models = variants(base, density)
    steps = {name: timed(make_step(name, model, ids, "fp32")[0]) for name, model in models.items()}
    times = interleaved(steps, rounds=rounds, warmup=warmup)
    rows = {}
    for name, series in times.items():
        summary = summarize(paired_ratios(series, times["q/v"]))
        rows[name] = {"ratio_to_qv": round(summary.median, 4), "ci95": [round(summary.ci_low, 4),
                                                                         round(summary.ci_high, 4)],
                      "median_step_s": round(sorted(series)[len(series) // 2], 4), "rounds": summary.rounds}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the small 4x256 model, batch 4 x 64")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--density", type=float, default=1e-3)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.rounds < 1 or args.warmup < 0 or not 0 < args.density <= 1:
        parser.error("need --rounds >= 1, --warmup >= 0 and 0 < --density <= 1")
    from randmask_lab.machine import describe, machine_info

    machine = machine_info("cpu")
    print(describe(machine), f"threads={torch.get_num_threads()}")
    rows = run(args.quick, args.rounds, args.warmup, args.density)
    for name, row in rows.items():
        print(f"{name:<22} step / q/v step {row['ratio_to_qv']:.3f} [{row['ci95'][0]:.3f}, {row['ci95'][1]:.3f}] "
              f"({row['rounds']} rounds)")
    if args.json:
        results = {"command": " ".join(["python", *sys.argv]), "machine": machine,
                   "threads": torch.get_num_threads(), "density": args.density, "quick": args.quick, "rows": rows}
        atomic_write_bytes(args.json, (json.dumps(results, indent=1) + "\n").encode())


if __name__ == "__main__":
    main()
