"""Training-step time and memory of randmask vs its peers, side by side in one process.

    python benchmarks/step_benchmark.py [--quick] [--json PATH]

OPT-125m-shaped random-init model, batch 8 x 128, causal-LM loss, CPU. Variants:
floor (frozen model, input gradients only), full fine-tuning, PEFT LoRA r=8 and
PEFT SHiRA (same count as LoRA r=8) on q/v, randmask at 0.1%, 0.01%, 0.001% of all
parameters on q/v; and LoRA r=8, SHiRA r=8, randmask 1% on all linear layers.
All variants are built first and timed round-robin (one step each per round), so
machine drift hits every variant alike; only ratios are meaningful.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

QV = ["q_proj", "v_proj"]
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


@dataclass
class Row:
    variant: str
    trainable: int
    step_ms_median: float
    ratio_to_floor: float
    ratio_to_lora: float
    peak_mb: float
    optimizer_state_bytes: int
    adapter_bytes: int


def build_base(quick: bool) -> torch.nn.Module:
    import transformers

    if quick:
        cfg = transformers.OPTConfig(hidden_size=256, num_hidden_layers=4, ffn_dim=1024, num_attention_heads=4,
                                     vocab_size=8192, max_position_embeddings=128, word_embed_proj_dim=256)
    else:  # facebook/opt-125m's shapes
        cfg = transformers.OPTConfig(hidden_size=768, num_hidden_layers=12, ffn_dim=3072, num_attention_heads=12,
                                     vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=768)
    torch.manual_seed(0)
    return transformers.OPTForCausalLM(cfg).eval()  # eval: no dropout, same math for every variant


def make_variants(base: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """name -> model with exactly its trainable parameters requiring grad."""
    from peft import LoraConfig, ShiraConfig, get_peft_model

    from randmask import MaskingConfig, apply_masking

    def frozen():
        model = copy.deepcopy(base)
        model.requires_grad_(False)
        return model

    variants: dict[str, torch.nn.Module] = {"floor": frozen()}
    variants["full"] = copy.deepcopy(base).requires_grad_(True)
    for scope, targets in (("q/v", QV), ("all-linear", ALL_LINEAR)):
        variants[f"lora r=8 {scope}"] = get_peft_model(
            copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets))
        variants[f"shira r=8 {scope}"] = get_peft_model(
            copy.deepcopy(base), ShiraConfig(r=8, target_modules=targets))
        ratios = (1e-3, 1e-4, 1e-5) if scope == "q/v" else (1e-2,)
        for ratio in ratios:
            variants[f"randmask {100 * ratio:g}% {scope}"] = apply_masking(
                frozen(), MaskingConfig(targets=targets, trainable_ratio=ratio, seed=0))
    return variants


class PeakRSS:
    """Peak resident-set growth (MB) while active, sampled from /proc/self/statm every ~1 ms."""

    def __init__(self) -> None:
        self.page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self.peak = 0

    def rss(self) -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * self.page
        except OSError:
            return 0

    def __enter__(self) -> PeakRSS:
        self.start = self.rss()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, self.rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def make_step(name: str, model: torch.nn.Module, ids: torch.Tensor):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None

    def step() -> None:
        if name == "floor":  # nothing trainable: backprop to the input embeddings only
            embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
            loss = model(inputs_embeds=embeds, labels=ids).loss
        else:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step, opt


def adapter_bytes(name: str, model: torch.nn.Module) -> int:
    if name == "floor":
        return 0
    if name == "full":
        return sum(p.numel() * p.element_size() for p in model.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        if name.startswith("randmask"):
            from randmask import save_adapter

            save_adapter(model, tmp)
        else:
            model.save_pretrained(tmp)
        return sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())


def state_bytes(opt) -> int:
    if opt is None:
        return 0
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
               if torch.is_tensor(t) and t.dim() > 0)


def run(quick: bool, rounds: int, clock=time.perf_counter) -> list[Row]:
    base = build_base(quick)
    batch, seq = (4, 64) if quick else (8, 128)
    ids = torch.randint(0, base.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    variants = make_variants(base)
    steps = {name: make_step(name, model, ids) for name, model in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in variants}
    peaks: dict[str, float] = dict.fromkeys(variants, 0.0)
    for step, _ in steps.values():  # warm-up round; creates optimizer state
        step()
    for r in range(rounds):
        order = list(steps) if r % 2 == 0 else list(reversed(steps))  # cancel position effects
        for name in order:
            with PeakRSS() as mem:
                t0 = clock()
                steps[name][0]()
                times[name].append(clock() - t0)
            peaks[name] = max(peaks[name], mem.growth_mb)
        print(f"round {r + 1}/{rounds} done", file=sys.stderr)
    med = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
    rows = []
    for name, model in variants.items():
        lora = med["lora r=8 all-linear" if "all-linear" in name else "lora r=8 q/v"]
        rows.append(Row(
            variant=name,
            trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
            step_ms_median=round(med[name], 1),
            ratio_to_floor=round(med[name] / med["floor"], 3),
            ratio_to_lora=round(med[name] / lora, 3),
            peak_mb=round(peaks[name], 1),
            optimizer_state_bytes=state_bytes(steps[name][1]),
            adapter_bytes=adapter_bytes(name, model),
        ))
    return rows


def format_table(rows: list[Row]) -> str:
    head = "| variant | trainable | ratio to floor | ratio to LoRA | peak MB | optimizer state B | adapter B |"
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r.variant} | {r.trainable:,} | {r.ratio_to_floor:.3f} | {r.ratio_to_lora:.3f} | "
              f"{r.peak_mb:.0f} | {r.optimizer_state_bytes:,} | {r.adapter_bytes:,} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small model (4x256), batch 4x64: under a minute")
    parser.add_argument("--rounds", type=int, default=None, help="timed steps per variant (default 5; quick 3)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's choice; 1 with --clock cpu)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall: elapsed time; cpu: the main thread's CPU time with 1 thread by default, "
                             "robust when other jobs share the machine")
    args = parser.parse_args(argv)
    threads = args.threads or (1 if args.clock == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    # thread_time: with 1 torch thread the forward, backward and optimizer all run on this thread,
    # and the memory-sampling thread's own CPU time is not counted.
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    print(f"clock={args.clock} threads={torch.get_num_threads()}", file=sys.stderr)
    rows = run(args.quick, args.rounds or (3 if args.quick else 5), clock)
    print(format_table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
