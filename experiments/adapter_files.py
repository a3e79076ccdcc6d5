"""What trustworthy adapter files cost, on SmolLM2-135M (real weights): base fingerprint time and
bytes, and file sizes of randmask's format against the PEFT SHiRA export.

    PYTHONPATH=src python experiments/adapter_files.py [--ratio 1e-3] [--reps 7]

Timings alternate the two variants in one process (the machine is shared): medians and ranges.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from randmask import MaskingConfig, apply_masking, load_adapter, masked_layers, save_adapter, unload
from randmask_lab.zoo import load_causal_lm


def _timed(fn, *args, **kwargs) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def _fingerprint_all(adapters: list) -> None:
    from randmask.integrity import base_fingerprint

    for adapter in adapters:
        base_fingerprint(adapter.base_values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=1e-3, help="trainable_ratio (the paper's 0.1%%)")
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, _ = load_causal_lm("smollm2-135m")
    for dtype in (torch.float32, torch.bfloat16):
        model = unload(model).to(dtype)
        apply_masking(model, MaskingConfig(trainable_ratio=args.ratio))
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.normal_(0, 1e-3)
        folder = Path(tempfile.mkdtemp())
        save_adapter(model, folder / "rm")
        header = json.loads((folder / "rm" / "adapter_config.json").read_text())
        nnz = header["trainable"]
        fp_bytes = sum(len(json.dumps({"base_fingerprint": m["base_fingerprint"]}, indent=1))
                       for m in header["matrices"].values())
        adapters = [layer.adapters["default"] for layer in masked_layers(model).values()]
        fingerprint = [_timed(_fingerprint_all, adapters) for _ in range(args.reps)]
        with_check, without = [], []
        for _ in range(args.reps):  # alternate: same machine state for both
            base = unload(model)
            with_check.append(_timed(load_adapter, base, folder / "rm", adapter_name="a"))
            base = unload(base)
            without.append(_timed(load_adapter, base, folder / "rm", adapter_name="a", verify_base=False))
            model = base
        from randmask.peft import export_shira

        export_shira(model, folder / "shira", adapter_name="a")
        rm_size = (folder / "rm" / "adapter.safetensors").stat().st_size
        shira_size = (folder / "shira" / "adapter_model.safetensors").stat().st_size
        shira_r = json.loads((folder / "shira" / "adapter_config.json").read_text())["r"]
        shira_entries = sum(t.numel() for k, t in load_file(str(folder / "shira" / "adapter_model.safetensors")).items()
                            if k.endswith(".shira_weight"))
        name = str(dtype).removeprefix("torch.")
        print(f"[{name}] {len(adapters)} matrices, {nnz:,} trained entries (trainable_ratio={args.ratio:g})")
        print(f"  base fingerprint: {statistics.median(fingerprint) * 1e3:.1f} ms to compute "
              f"(range {min(fingerprint) * 1e3:.1f}-{max(fingerprint) * 1e3:.1f}), {fp_bytes:,} config bytes "
              f"({fp_bytes / len(adapters):.0f} per matrix)")
        print(f"  load_adapter: {statistics.median(with_check) * 1e3:.0f} ms with verify_base "
              f"(range {min(with_check) * 1e3:.0f}-{max(with_check) * 1e3:.0f}), "
              f"{statistics.median(without) * 1e3:.0f} ms without "
              f"(range {min(without) * 1e3:.0f}-{max(without) * 1e3:.0f})")
        print(f"  files: randmask {rm_size:,} B = {rm_size / nnz:.2f} B/entry; SHiRA (r={shira_r}, zero-padded) "
              f"{shira_size:,} B = {shira_size / nnz:.2f} B/trained entry, {shira_size / shira_entries:.2f} B per "
              f"stored entry ({shira_entries:,} stored)")


if __name__ == "__main__":
    main()
