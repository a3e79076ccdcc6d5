"""Regenerate the README's SmolLM2 study section from the committed files alone.

Runs the project's own commands on experiments/results/ and writes their output verbatim between
the README's `<!-- study:start -->` and `<!-- study:end -->` markers, so every number there was
printed by a command a reader can rerun:
  randmask report --from experiments/results/smollm2_study.jsonl --figures experiments/results/smollm2_study
  randmask figure4 experiments/results/analysis_smollm2_sst2 --out experiments/results/analysis_smollm2_sst2
  randmask findings --from ... --theory ... --analysis ...
  randmask study experiments/smollm2_study.json --export ... --plan   (what is left, into a scratch out-dir)
Usage: python experiments/update_readme_study.py   (from the repository root; takes ~10 s)
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

from randmask_lab.study.records import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
SPEC = "experiments/smollm2_study.json"
STUDY = "experiments/results/smollm2_study.jsonl"
FIGURES = "experiments/results/smollm2_study"
ANALYSIS = "experiments/results/analysis_smollm2_sst2"
THEORY = "experiments/results/theory/theory_summary.json"
START, END = "<!-- study:start -->", "<!-- study:end -->"


def run(*args: str) -> str:
    """Output of one randmask command (the CLI of this checkout's environment)."""
    cli = Path(sys.executable).with_name("randmask")
    done = subprocess.run([str(cli), *args], cwd=ROOT, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def status() -> str:
    """Records, runs per task, and the compute the finished runs took (all attempts up to their checkpoints)."""
    records = read_jsonl(ROOT / STUDY)
    per_task = Counter(r.config["task"] for r in records)
    hours = sum(r.compute_seconds for r in records) / 3600
    tasks = ", ".join(f"{task} {n}" for task, n in per_task.items())
    resumed = [r for r in records if r.resumed_at is not None]
    carried = (f" That counts, for the {len(resumed)} runs resumed from a checkpoint, the time their earlier attempts "
               "spent up to it; work lost after a checkpoint is not counted.") if resumed else ""
    timed = [r for r in records if r.cpu_seconds is not None]
    unknown = sum(1 for r in timed if r.resumed_at is not None and r.carried_cpu_seconds is None)
    cpu = (f" The {len(timed)} records made since runs record their CPU time took "
           f"{sum(r.compute_cpu_seconds or 0.0 for r in timed) / 3600:.1f} CPU-hours (wall time also counts pauses "
           "of the workers" + (f"; {unknown} of them, resumed before earlier attempts' CPU time was kept, count "
                                "their finishing attempt only" if unknown else "") + ").") if timed else ""
    return (f"`{STUDY}` holds {len(records)} records (runs per task: {tasks}); their wall times sum to "
            f"{hours:.1f} worker-hours (one thread each, two workers sharing the two cores).{carried}{cpu}")


def progress() -> str:
    """Whether the study is complete, by the plan a fresh machine would make from the committed file."""
    with tempfile.TemporaryDirectory() as scratch:  # an empty out-dir: only the committed records count
        left = run("study", SPEC, "--out-dir", scratch, "--export", STUDY, "--plan").splitlines()[-1]
    command = f"`randmask study {SPEC} --export {STUDY} --plan`"
    if left.startswith("0 runs planned next"):
        return f"The study is complete: {command} plans no more runs."
    return (f"The study is still running (it continues in the next session from the committed file); {command} "
            f"printed \"{left}\". Cells with `(n=1)` wait for seeds 1 and 2 and are not results yet, and a "
            "finding on fewer than four tasks is provisional.")


def section() -> str:
    report = [line for line in run("report", "--from", STUDY, "--figures", FIGURES).splitlines()
              if not line.startswith("wrote ")]
    parts = [status(), "", progress(), "",
             f"`randmask report --from {STUDY} --figures {FIGURES}` printed:", "", *report, "",
             f"![Fig. 3 analogue]({FIGURES}/smollm2-135m_lr_curves.png)", ""]
    if (ROOT / FIGURES / "smollm2-135m_structured.png").is_file():
        parts += [f"![structured vs random]({FIGURES}/smollm2-135m_structured.png)", ""]
    findings = ["findings", "--from", STUDY, "--theory", THEORY]
    if (ROOT / ANALYSIS).is_dir():
        table = run("figure4", ANALYSIS, "--out", ANALYSIS)
        parts += [f"`randmask figure4 {ANALYSIS} --out {ANALYSIS}` printed the Fig. 4 analogue, measured by "
                  "`experiments/analysis_smollm2_sst2.sh` (its JSON files are committed there): the Hessian norm "
                  "max |λ| (the paper's \"norm of the hessian ... using the power method\") of the training loss on "
                  "one batch of 8 SST-2 training prompts, power iteration to a relative change of 1e-2, w.r.t. each "
                  "method's own trainable parameters; before training at the pretrained weights, after training at "
                  "each cell's chosen LR; seeds 0-2 (each seed its own mask, batch and run); the distance is the "
                  "L2 norm of the weight delta (LoRA: of its merged delta):", "",
                  *[line for line in table.splitlines() if not line.startswith("wrote ")], "",
                  f"![Fig. 4a analogue]({ANALYSIS}/lambda_max.png) ![Fig. 4b analogue]({ANALYSIS}/distance.png)", ""]
        findings += ["--analysis", ANALYSIS]
    parts += [f"`randmask {' '.join(findings)}` printed:", "", "```", run(*findings), "```"]
    return "\n".join(parts)


def main() -> int:
    readme = ROOT / "README.md"
    text = readme.read_text()
    if START not in text or END not in text:
        sys.exit(f"README.md lacks the {START} / {END} markers; put them where the study section goes.")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{section()}\n{END}{tail}")
    print(f"updated the study section of {readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
