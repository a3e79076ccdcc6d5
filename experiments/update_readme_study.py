"""Regenerate the SmolLM2 study's results (docs/results.md) and the README's headline table from the committed files.

Runs the project's own commands on experiments/results/ and writes their output verbatim between
docs/results.md's `<!-- study:start -->` and `<!-- study:end -->` markers, and the report's first table
(with its protocol and legend lines) between README.md's `<!-- headline:start -->` and `<!-- headline:end -->`,
so every number in either was printed by a command a reader can rerun:
  randmask report --from experiments/results/smollm2_study.jsonl --figures experiments/results/smollm2_study
  randmask figure4 experiments/results/analysis_smollm2_sst2 --out experiments/results/analysis_smollm2_sst2
  randmask findings --from ... --theory ... --analysis ...
  randmask study experiments/smollm2_study.json --export ... --plan   (what is left, into a scratch out-dir)
Usage: python experiments/update_readme_study.py   (from the repository root; it runs the four commands above)
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
STUDY_MARKERS = ("<!-- study:start -->", "<!-- study:end -->")
HEADLINE_MARKERS = ("<!-- headline:start -->", "<!-- headline:end -->")


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
        plan = run("study", SPEC, "--out-dir", scratch, "--export", STUDY, "--plan").splitlines()
    # the summary line (a power calculation follows it since --plan has one)
    left = next(line for line in plan if " runs planned next" in line)
    command = f"`randmask study {SPEC} --export {STUDY} --plan`"
    if left.startswith("0 runs planned next"):
        return f"The study is complete: {command} plans no more runs."
    return (f"The study is still running (it continues in the next session from the committed file); {command} "
            f"printed \"{left}\". Cells with `(n=1)` wait for seeds 1 and 2 and are not results yet, and a "
            "finding on fewer than four tasks is provisional.")


def report() -> list[str]:
    """`randmask report`'s lines (it also rewrites the figures), less its "wrote <file>" notes."""
    return [line for line in run("report", "--from", STUDY, "--figures", FIGURES).splitlines()
            if not line.startswith("wrote ")]


def headline(lines: list[str]) -> str:
    """The README's short version: the report's first table (the study's main one), its protocol and legend lines."""
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    notes = [line for line in lines if line.startswith(("Protocols:", "Cells:"))]
    return "\n".join([f"`randmask report --from {STUDY}` printed (the main table; the paired differences, figures and "
                      "the paper's findings are in [the study results](docs/results.md)):", "",
                      *lines[start:end], "", *notes])


def section(lines: list[str], up: str) -> str:
    """The full study section; ``up`` leads from the page it goes into to the repository root (for figures)."""
    FIGURES_, ANALYSIS_ = up + FIGURES, up + ANALYSIS
    parts = [status(), "", progress(), "",
             f"`randmask report --from {STUDY} --figures {FIGURES}` printed:", "", *lines, "",
             f"![Fig. 3 analogue]({FIGURES_}/smollm2-135m_lr_curves.png)", ""]
    if (ROOT / FIGURES / "smollm2-135m_structured.png").is_file():
        parts += [f"![structured vs random]({FIGURES_}/smollm2-135m_structured.png)", ""]
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
                  f"![Fig. 4a analogue]({ANALYSIS_}/lambda_max.png) ![Fig. 4b analogue]({ANALYSIS_}/distance.png)", ""]
        findings += ["--analysis", ANALYSIS]
    parts += [f"`randmask {' '.join(findings)}` printed:", "", "```", run(*findings), "```"]
    return "\n".join(parts)


def replace_between(path: Path, markers: tuple[str, str], body: str) -> None:
    """Write ``body`` between the two markers of the file at ``path`` (atomically: a temporary file, then a rename)."""
    start, end = markers
    text = path.read_text()
    if start not in text or end not in text:
        sys.exit(f"{path.relative_to(ROOT)} lacks the {start} / {end} markers; put them where the section goes.")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    scratch = path.with_name(f".{path.name}.tmp")
    scratch.write_text(f"{head}{start}\n{body}\n{end}{tail}")
    scratch.replace(path)
    print(f"updated {path.relative_to(ROOT)} between {start} and {end}")


def main() -> int:
    lines = report()
    replace_between(ROOT / "docs" / "results.md", STUDY_MARKERS, section(lines, up="../"))
    replace_between(ROOT / "README.md", HEADLINE_MARKERS, headline(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
