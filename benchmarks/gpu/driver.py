"""Every GPU number of randmask in one call (benchmarks/gpu/run.sh runs this; see its header).

Sections, each writing ``<out>/gpu_<section>.json`` (with ``randmask_lab.machine.machine_info``), then
``<out>/gpu_summary.md`` with every table and the issue's GPU targets:

    tests   the library's device tests on CUDA (test_devices, test_triton_sddmm, test_ops);
    sddmm   the masked weight gradient alone at OPT-1.3b shapes (sddmm_gpu.py);
    step    the training step at OPT-1.3b shape, batch 8 x 512, bf16-mixed (step_benchmark's machinery),
            plus torch.cuda.max_memory_allocated of each variant built alone;
    runner  one SmolLM2-135M SST-2 run through the lab's runner, its median step time;
    compile (not in the default set: inductor compiles for a minute or more per variant) the training step under
            ``torch.compile`` against eager at OPT-125m's shapes, randmask and LoRA (benchmarks/compile_step.py).

``--dry-run`` runs the same logic on the CPU at tiny shapes (the tests only collected, the model a tiny
Llama) in well under a minute: CI runs it (tests/benchmarks/test_gpu_driver.py).
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CARRY = Path(__file__).resolve().parent / "carry"  # filled by run.sh --prepare; carried to the GPU machine
GPU_TESTS = [
    "tests/randmask/test_devices.py", "tests/randmask/test_triton_sddmm.py", "tests/randmask/test_ops.py",
    "tests/randmask/test_sddmm.py", "tests/randmask/test_kernels.py",  # the tests that left test_ops.py
]


def write_json(out: Path, section: str, payload: dict, device: str) -> Path:
    from randmask_lab.machine import machine_info

    path = out / f"gpu_{section}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"machine": machine_info(device), **payload}, indent=1) + "\n")
    tmp.replace(path)  # atomic
    return path


def run_tests(dry_run: bool, log) -> dict:
    """pytest on the device tests (TRITON_INTERPRET off: the kernel compiles for the GPU)."""
    env = {**os.environ, "TRITON_INTERPRET": "1" if dry_run else "0", "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *GPU_TESTS]
    if dry_run:
        cmd.append("--collect-only")
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    tail = proc.stdout.strip().splitlines()[-1:] or [proc.stderr.strip()[-300:]]
    log(f"tests: {tail[0]}")
    return {"command": " ".join(cmd[1:]), "returncode": proc.returncode, "summary": tail[0],
            "seconds": round(time.time() - t0, 1)}


def gpu_peak_bytes(variant: str, base, batch: tuple[int, int], precision: str) -> int | None:
    """torch.cuda.max_memory_allocated over one step of ``variant`` (a copy of ``base``, the only other model
    on the GPU), after two warm-up steps; None on the CPU (where the same steps run: the dry run)."""
    import copy

    import torch

    from bench_models import batch_ids, make_step, make_variant

    cuda = next(base.parameters()).device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
    model = make_variant(variant, copy.deepcopy(base))
    step, _, _ = make_step(variant, model, batch_ids(model, False, batch), precision)
    step()
    step()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    step()
    peak = torch.cuda.max_memory_allocated() if cuda else None
    del model, step
    if cuda:
        torch.cuda.empty_cache()
    return peak


def run_step(dry_run: bool, device: str, max_minutes: float, log) -> list[dict]:
    from bench_models import build_base
    from step_benchmark import time_precision

    # The dry run in fp32: this logic is precision-blind, and CPUs without native bf16 run it ~48x slower.
    shape, batch, precision = ("tiny", (2, 16), "fp32") if dry_run else ("opt-1.3b", (8, 512), "bf16-mixed")
    rounds = (2, 2) if dry_run else (10, 30)
    only = ["shira r=8 q/v", "randmask 0.1% q/v", "randmask 1% all-linear"] if dry_run else None  # + floor, LoRA
    rows = time_precision(precision, False, rounds[0], rounds[1], 1 if dry_run else 2, 0.02, log, max_minutes,
                          only, shape, batch, device)
    gc.collect()  # the timing phase's models leave the GPU before the memory phase
    base = build_base(False, precision, shape, device)
    for r in rows:
        r["shape"], r["batch"] = shape, list(batch)
        r["max_memory_allocated"] = gpu_peak_bytes(r["variant"], base, batch, precision)
    return rows


def smollm_folder(dry_run: bool, explicit: str | None, work: Path) -> tuple[Path, str]:
    """(model folder, note): the SmolLM2 weights when present, else its config and tokenizer at random init."""
    if dry_run:
        sys.path.insert(0, str(ROOT))
        from tests.randmask_lab.experiment.tiny import make_tiny_lm

        return make_tiny_lm(work / "tiny_lm"), "dry run: a tiny random Llama"
    from randmask_lab.zoo import cache_dir

    candidates = [Path(explicit)] if explicit else [CARRY / "smollm2-135m", cache_dir() / "models" / "smollm2-135m"]
    folder = next((c for c in candidates if (c / "config.json").is_file()), None)
    if folder is None:
        raise FileNotFoundError(f"no SmolLM2 folder among {[str(c) for c in candidates]}: run run.sh --prepare")
    if (folder / "model.safetensors").is_file():
        return folder, "SmolLM2-135M weights"
    import torch
    import transformers as tf

    target = work / "smollm2-random"
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(tf.AutoConfig.from_pretrained(folder)).save_pretrained(target)
    tf.AutoTokenizer.from_pretrained(folder).save_pretrained(target)
    return target, "SmolLM2-135M shape at random init (weights not carried): step time only, accuracy meaningless"


def run_runner(dry_run: bool, device: str, model_dir: str | None, data_dir: str | None, log) -> dict:
    from randmask_lab.experiment import RunConfig, run_training

    with tempfile.TemporaryDirectory() as tmp:
        folder, note = smollm_folder(dry_run, model_dir, Path(tmp))
        default_data = CARRY / "data"
        config = RunConfig(model=str(folder), task="sst2", method="randmask", ratio=1e-3, lr=1e-3,
                           precision="32" if dry_run else "bf16-mixed", device=device, epochs=1, batch_size=8,
                           n_train=24 if dry_run else 400, n_val=8 if dry_run else 64, n_test=8 if dry_run else 64,
                           max_length=64 if dry_run else 256, out_dir=str(Path(tmp) / "runs"), progress=False,
                           checkpoint_every=-1, save_adapter=False,
                           data_dir=data_dir or (str(default_data) if default_data.is_dir() else None))
        t0 = time.time()
        record = run_training(config)
        with (Path(record.run_dir) / "steps.csv").open(newline="") as f:
            seconds = [float(r["seconds"]) for r in csv.DictReader(f)]
    per_step = [b - a for a, b in zip(seconds, seconds[1:])][2:] or [seconds[0]]  # the first steps warm up
    result = {"note": note, "run_id": record.run_id, "status": record.status, "steps": len(seconds),
              "step_seconds_median": round(statistics.median(per_step), 4), "train_seconds": record.train_seconds,
              "wall_seconds": round(time.time() - t0, 1), "test_metric": record.test_metric,
              "config": {k: v for k, v in config.to_dict().items() if k in ("precision", "batch_size", "ratio",
                                                                              "max_length", "n_train")}}
    log(f"runner: {result['steps']} steps, median {1e3 * result['step_seconds_median']:.1f} ms/step ({note})")
    return result


def run_compile(dry_run: bool, device: str, log) -> dict:
    """compile_step.py's paired ratios on ``device``: a tiny shape on aot_eager in the dry run."""
    import compile_step

    shape, backend = ("tiny", "aot_eager") if dry_run else ("opt-125m", "inductor")
    steps, compile_seconds = compile_step.build(shape, device, backend)
    ratios = compile_step.report(compile_step.time_rounds(steps, 2 if dry_run else 10, 1 if dry_run else 2, device))
    medians = ", ".join(f"{name} {r['median']:.3f}" for name, r in ratios.items())
    log(f"compile: {medians}")
    return {"shape": shape, "backend": backend, "ratios": ratios,
            "compile_and_first_step_seconds": {m: round(s, 1) for (m, _), s in compile_seconds.items()}}


def run_mixed(dry_run: bool, device: str, out: Path, log) -> dict:
    """mixed_layouts.py on ``device``: each mixed-batch layout over the plain layer, eager and compiled, at lengths
    from a decode step to a long prefill, over 32 adapters: the data to set ``GATHERED_MAX_ELEMENTS`` and
    ``TRACED_GATHERED_MAX_ELEMENTS`` on a GPU (both were set on the CPU, the second by memory alone)."""
    import mixed_layouts

    if dry_run:
        argv = ["--dim", "64", "--adapters", "3", "--rows", "6", "--ratio", "0.05", "--tokens", "1", "8",
                "--rounds", "2", "--warmup", "1", "--backend", "aot_eager"]
    else:  # OPT-1.3b's width; rows x T x N from 0.1 to 270 million: both limits lie inside
        argv = ["--dim", "2048", "--adapters", "32", "--rows", "32", "--tokens", "1", "16", "128", "512",
                "--rounds", "11"]
    json_path = str(out / "gpu_mixed_layouts.json")
    result = mixed_layouts.main([*argv, "--compiled", "--device", device, "--json", json_path])
    for run in result["runs"]:
        log(f"mixed T={run['tokens']}: " + ", ".join(f"{k} {v['median']:.2f}" for k, v in run["ratios"].items()))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="the same logic on the CPU at tiny shapes")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for gpu_*.json and gpu_summary.md (default benchmarks/results; dry run: a "
                             "temporary folder)")
    parser.add_argument("--sections", default="tests,sddmm,step,runner",
                        help="comma-separated subset, or more: compile, mixed")
    parser.add_argument("--step-minutes", type=float, default=2.5, help="cap on the step benchmark's timed rounds")
    parser.add_argument("--sddmm-rounds", type=int, default=None, help="timed rounds per SDDMM cell (default 15)")
    parser.add_argument("--smollm-dir", default=None, help="SmolLM2 folder (default: carry/, then the zoo cache)")
    parser.add_argument("--data-dir", default=None, help="task data (default: carry/data, then the runner's)")
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the kernel on the CPU
    sys.path[:0] = [str(ROOT / "src"), str(ROOT / "benchmarks"), str(Path(__file__).resolve().parent)]
    import sddmm_gpu
    import torch
    from report import summary, targets

    from randmask_lab.machine import describe, machine_info

    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("benchmarks/gpu: no CUDA device here; run with --dry-run to check the logic on the CPU", file=sys.stderr)
        return 2
    out = args.out or (Path(tempfile.mkdtemp(prefix="randmask-gpu-dry-run-")) if args.dry_run
                       else ROOT / "benchmarks" / "results")
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    started = time.time()
    tests = run_tests(args.dry_run, log) if "tests" in sections else {"summary": "not run", "returncode": None}
    write_json(out, "tests", tests, device)
    sddmm = (sddmm_gpu.run(device, args.dry_run, args.sddmm_rounds or (2 if args.dry_run else 15), log)
             if "sddmm" in sections else [])
    write_json(out, "sddmm", {"rows": sddmm}, device)
    step = run_step(args.dry_run, device, args.step_minutes, log) if "step" in sections else []
    write_json(out, "step", {"rows": step}, device)
    runner = (run_runner(args.dry_run, device, args.smollm_dir, args.data_dir, log)
              if "runner" in sections else None)
    write_json(out, "runner", {"result": runner}, device)
    if "compile" in sections:
        write_json(out, "compile", run_compile(args.dry_run, device, log), device)
    if "mixed" in sections:  # writes gpu_mixed_layouts.json itself, after each length
        run_mixed(args.dry_run, device, out, log)
    checks = targets(sddmm, step)
    write_json(out, "targets", {"targets": checks, "dry_run": args.dry_run,
                                "minutes": round((time.time() - started) / 60, 2)}, device)
    text = summary(describe(machine_info(device)), tests, sddmm, step, runner, checks)
    (out / "gpu_summary.md").write_text(text)
    print(text)
    log(f"wrote {out}/gpu_*.json and gpu_summary.md in {time.time() - started:.0f} s")
    return 0 if tests.get("returncode") in (0, None) else 1


if __name__ == "__main__":
    raise SystemExit(main())
