"""The cost of keeping bitsandbytes' AVX512-bf16 CPU repacking off: SmolLM2-135M eval forwards on a 4-bit base.

    python benchmarks/quantized_eval.py [--quantize nf4] [--rounds 7] [--json PATH]

On a CPU with AVX512-bf16, bitsandbytes (0.50) repacks a ``Linear4bit`` weight in place for a fused kernel at
its first eval forward without gradients; that breaks training through the layer afterwards (docs/quantized.md),
so randmask and the lab turn it off (``randmask.disable_bnb_cpu_repacking``). This measures what that costs an
eval: two copies of the same 4-bit base, loaded by the lab's loader (repacking off), one of them with
bitsandbytes' flag set back on; the loss of the first 8 (``--batch``) SST-2 validation prompts (LM mode) under
``torch.no_grad`` in eval mode, one forward each per round, the order reversed every other round; the ratio
of the standard-packing forward to the repacked one per round, median and bootstrap 95% CI. On a CPU without
AVX512-bf16 the two are one code path, and the script says so and exits.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

from bench_machine import save_json
from bench_stats import interleaved, paired_ratios, summarize, timed
from randmask_lab.argtypes import positive_int
from randmask_lab.machine import describe, machine_info

warnings.filterwarnings("ignore")


def build(quantize: str, repacking: bool, batch_size: int):
    """(model, eval forward) on the lab's 4-bit SmolLM2, with bitsandbytes' CPU repacking on or off."""
    from randmask_lab.experiment import RunConfig
    from randmask_lab.experiment.parts.assemble import check_names, load_data, load_model, make_objective

    config = RunConfig(model="smollm2-135m", task="sst2", mode="lm", method="zeroshot", n_train=8, n_val=batch_size,
                       n_test=8, max_length=512, quantize=quantize)
    spec = check_names(config)
    model, tokenizer = load_model(config, spec, "lm", device=torch.device("cpu"))
    data = load_data(config, spec, "lm", tokenizer)
    objective = make_objective(config, data, tokenizer)
    flagged = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = repacking
            flagged += 1
    if not flagged:
        raise SystemExit(f"no bitsandbytes 4-bit layer carries the repacking flag under --quantize {quantize}")
    model.eval()
    batch = data.val[:batch_size]

    def forward() -> float:
        with torch.no_grad():
            return float(objective.loss(model, batch))

    return model, forward


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quantize", default="nf4", choices=("nf4", "fp4"))
    parser.add_argument("--rounds", type=positive_int, default=7)
    parser.add_argument("--batch", type=positive_int, default=8, help="validation prompts per forward")
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from bitsandbytes.nn.modules import has_avx512bf16  # the check bitsandbytes itself makes

    if not has_avx512bf16():
        print(f"on {describe()}: no AVX512-bf16, so bitsandbytes never repacks here; nothing to compare")
        return 0
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    forwards, losses = {}, {}
    for name, repacking in (("standard packing", False), ("repacked", True)):
        forwards[name] = build(args.quantize, repacking, args.batch)[1]
        losses[name] = forwards[name]()  # the repacked copy repacks here, before any timing
    times = interleaved({name: timed(forward) for name, forward in forwards.items()}, args.rounds,
                        on_round=lambda r, t: log(f"round {r + 1}: "
                                                  + ", ".join(f"{n} {t[n][-1]:.3f} s" for n in forwards)))
    s = summarize(paired_ratios(times["standard packing"], times["repacked"]))
    print(f"on {describe()}, {args.threads} threads, {args.quantize}, {args.batch} prompts: an eval forward in the "
          f"standard packing takes {s.median:.2f}x [{s.ci_low:.2f}, {s.ci_high:.2f}] the repacked one's time "
          f"({s.rounds} rounds); "
          f"loss {losses['standard packing']:.4f} vs {losses['repacked']:.4f}")
    if args.json:
        payload = {"settings": {"quantize": args.quantize, "rounds": args.rounds, "threads": args.threads,
                                "batch": args.batch, "torch": torch.__version__, "machine": machine_info(),
                                "command": "python benchmarks/quantized_eval.py " + " ".join(argv or sys.argv[1:])},
                   "ratio_standard_to_repacked": round(s.median, 4), "ci_low": round(s.ci_low, 4),
                   "ci_high": round(s.ci_high, 4), "rounds": s.rounds,
                   "loss": {k: round(v, 6) for k, v in losses.items()}}
        save_json(args.json, payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
