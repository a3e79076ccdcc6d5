"""The GPU benchmark's markdown summary and the issue's GPU targets (benchmarks/gpu/driver.py writes them)."""

from __future__ import annotations

from sddmm_gpu import table as sddmm_table

from step_benchmark import format_table


def _ratio(rows: list[dict], shape: str, density: float, way: str) -> float | None:
    r = next((r for r in rows if r["shape"] == shape and r["density"] == density and r["way"] == way), None)
    return None if r is None else r["ratio_to_dense"]


def targets(sddmm: list[dict], step: list[dict]) -> list[dict]:
    """Each target of the issue, evaluated on medians (CIs in the tables)."""
    out = []

    def add(target: str, holds: bool | None, detail: str) -> None:
        out.append({"target": target, "holds": holds, "detail": detail})

    for shape in dict.fromkeys(r["shape"] for r in sddmm):
        for density, limit in ((1e-3, 0.05), (1e-2, 0.25)):
            t = _ratio(sddmm, shape, density, "triton")
            add(f"triton <= {limit}x dense at {density:g} ({shape})", None if t is None else t <= limit, f"{t}")
        slower = [(r["density"], r["ratio_to_dense"], _ratio(sddmm, shape, r["density"], "sampled_addmm"))
                  for r in sddmm if r["shape"] == shape and r["way"] == "triton" and r["density"] <= 0.1]
        add(f"triton faster than sampled_addmm at every density <= 10% ({shape})",
            all(t < s for _, t, s in slower if s is not None) if slower else None,
            "; ".join(f"{d:g}: {t} vs {s}" for d, t, s in slower))
    by = {r["variant"]: r for r in step}
    lora_mem = min((r["max_memory_allocated"] for n, r in by.items() if n.startswith("lora")
                    and r["max_memory_allocated"] is not None), default=None)
    for name, r in by.items():
        if not name.startswith("randmask"):
            continue
        all_linear = name.endswith("all-linear")
        limit = 1.05 if all_linear else 1.02
        add(f"{name} <= {limit}x floor", r["ratio_to_floor"] <= limit,
            f"{r['ratio_to_floor']:.3f} [{r['ratio_ci_low']:.3f}, {r['ratio_ci_high']:.3f}]")
        for peer in (["lora r=8 all-linear", "shira r=8 all-linear"] if all_linear else ["lora r=8 q/v"]):
            if peer in by:
                add(f"{name} below {peer}", r["ratio_to_floor"] < by[peer]["ratio_to_floor"],
                    f"{r['ratio_to_floor']:.3f} vs {by[peer]['ratio_to_floor']:.3f}")
        mem = r["max_memory_allocated"]
        add(f"{name} peak memory <= LoRA's", None if mem is None or lora_mem is None else mem <= lora_mem,
            f"{mem} vs {lora_mem} bytes")
    return out


def summary(machine: str, tests: dict, sddmm: list[dict], step: list[dict], runner: dict | None,
            checks: list[dict]) -> str:
    """The markdown file: every table, then the targets."""
    lines = [f"# randmask on {machine}", "", f"Tests: `{tests['summary']}` (exit {tests['returncode']})", "",
             "## Masked weight gradient alone (bf16 inputs; ratio to dense g^T x [95% CI])", "", sddmm_table(sddmm),
             "", f"## Training step ({step[0]['precision'] if step else '-'}; ratio to the floor [95% CI])", "",
             format_table(step), "",
             "| variant | torch.cuda.max_memory_allocated (MB) |", "|---|---:|"]
    for r in step:
        mem = r["max_memory_allocated"]
        lines.append(f"| {r['variant']} | {'' if mem is None else f'{mem / 2**20:,.0f}'} |")
    if runner is not None:
        lines += ["", "## SmolLM2-135M SST-2 through the runner", "",
                  f"{runner['steps']} steps, median {1e3 * runner['step_seconds_median']:.1f} ms per step "
                  f"({runner['note']}; {runner['config']})."]
    lines += ["", "## Targets", "", "| target | holds | measured |", "|---|---|---|"]
    for c in checks:
        holds = "n/a" if c["holds"] is None else ("yes" if c["holds"] else "NO")
        lines.append(f"| {c['target']} | {holds} | {c['detail']} |")
    return "\n".join(lines) + "\n"
