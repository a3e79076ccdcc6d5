"""Regenerate the studies' result pages and the README's study sections from the committed files.

Runs the project's own commands on experiments/results/ and writes their output verbatim between markers, so every
number in the pages or the README was printed by a command a reader can rerun:
- the exploratory study (experiments/smollm2_study.json) into docs/results.md (`<!-- study:start/end -->`) and its
  main table into README.md (`<!-- headline:start/end -->`):
    randmask report --from experiments/results/smollm2_study.jsonl --spec experiments/smollm2_study.json \
        --figures experiments/results/smollm2_study
    randmask figure4 experiments/results/analysis_smollm2_sst2 --out experiments/results/analysis_smollm2_sst2
    randmask findings --from ... --theory ... --analysis ...
    randmask study experiments/smollm2_study.json --export ... --plan   (what is left, into a scratch out-dir)
- the confirmatory study (experiments/smollm2_confirm.json) into docs/confirmatory.md (`<!-- confirm:start/end -->`)
  and its verdicts into README.md (`<!-- verdicts:start/end -->`): the same report and findings, and the plan's
  power calculation (from the study's own per-seed spreads once it has them, else from the exploratory study's).
Usage: python experiments/update_readme_study.py [exploratory|confirm ...]   (from the repository root; both by default)
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from randmask_lab.study.records import read_jsonl
from randmask_lab.study.stats import FAR_OFF_Z

ROOT = Path(__file__).resolve().parents[1]
THEORY = "experiments/results/theory/theory_summary.json"
ANALYSIS = "experiments/results/analysis_smollm2_sst2"


@dataclass(frozen=True)
class Study:
    """One study: its spec, its committed records, where its figures go and which markers its sections fill."""

    spec: str
    records: str
    figures: str
    page: str
    page_markers: tuple[str, str]
    readme_markers: tuple[str, str]


EXPLORATORY = Study("experiments/smollm2_study.json", "experiments/results/smollm2_study.jsonl",
                    "experiments/results/smollm2_study", "docs/results.md",
                    ("<!-- study:start -->", "<!-- study:end -->"),
                    ("<!-- headline:start -->", "<!-- headline:end -->"))
CONFIRM = Study("experiments/smollm2_confirm.json", "experiments/results/smollm2_confirm.jsonl",
                "experiments/results/smollm2_confirm", "docs/confirmatory.md",
                ("<!-- confirm:start -->", "<!-- confirm:end -->"),
                ("<!-- verdicts:start -->", "<!-- verdicts:end -->"))
STUDIES = {"exploratory": EXPLORATORY, "confirm": CONFIRM}


def run(*args: str) -> str:
    """Output of one randmask command (the CLI of this checkout's environment)."""
    cli = Path(sys.executable).with_name("randmask")
    done = subprocess.run([str(cli), *args], cwd=ROOT, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def _machine(info: dict) -> str:
    """``AMD EPYC (AVX2/no-bf16)``, with the GPU where a run used one (``..., on NVIDIA H200``)."""
    if not info:
        return "not recorded"
    gpu = f", on {info['device']}" if info.get("device", "cpu") != "cpu" else ""
    return f"{info['cpu_model']} ({info['cpu_kind']}){gpu}"


def status(study: Study) -> str:
    """Records, runs per task, the machines they ran on, and the compute the finished runs took."""
    records = read_jsonl(ROOT / study.records)
    per_task = Counter(r.config["task"] for r in records)
    hours = sum(r.compute_seconds for r in records) / 3600
    tasks = ", ".join(f"{task} {n}" for task, n in per_task.items())
    resumed = [r for r in records if r.resumed_at is not None]
    runs = f"{len(resumed)} run{'s' * (len(resumed) != 1)}"
    their = "its" if len(resumed) == 1 else "their"
    carried = (f" That counts, for the {runs} resumed from a checkpoint, the time {their} earlier attempts spent up "
               "to it; work lost after a checkpoint is not counted.") if resumed else ""
    timed = [r for r in records if r.cpu_seconds is not None]
    unknown = sum(1 for r in timed if r.resumed_at is not None and r.carried_cpu_seconds is None)
    cpu = (f" The {len(timed)} records made since runs record their CPU time took "
           f"{sum(r.compute_cpu_seconds or 0.0 for r in timed) / 3600:.1f} CPU-hours (wall time also counts pauses "
           "of the workers" + (f"; {unknown} of them, resumed before earlier attempts' CPU time was kept, count "
                                "their finishing attempt only" if unknown else "") + ").") if timed else ""
    machines = Counter(_machine(r.machine) for r in records)
    where = ", ".join(f"{name} {n}" for name, n in machines.most_common())
    moved = sum(1 for r in records if r.earlier_code_versions)
    was, they = ("was", "it") if moved == 1 else ("were", "they")
    code = (f" {moved} of them {was} resumed under another commit than {they} started at; each names every commit "
            "it ran (`earlier_code_versions`).") if moved else ""
    return (f"`{study.records}` holds {len(records)} records (runs per task: {tasks}; machines: {where}); their wall "
            f"times sum to {hours:.1f} worker-hours (one thread each, two workers sharing the two cores)."
            f"{carried}{cpu}{code}")


def plan(study: Study, *extra: str) -> list[str]:
    """`randmask study --plan` as a fresh machine would print it from the committed file alone."""
    with tempfile.TemporaryDirectory() as scratch:  # an empty out-dir: only the committed records count
        return run("study", study.spec, "--out-dir", scratch, "--export", study.records, "--plan", *extra).splitlines()


def progress(study: Study, lines: list[str]) -> str:
    """Whether the study is complete, from its plan's summary line."""
    left = next(line for line in lines if " runs planned next" in line)
    command = f"`randmask study {study.spec} --export {study.records} --plan`"
    if left.startswith("0 runs planned next"):
        return f"The study is complete: {command} plans no more runs."
    return (f"The study is still running (it continues in the next session from the committed file); {command} "
            f"printed \"{left}\". Cells with `(n=1)` wait for more seeds and are not results yet, and a "
            "finding on fewer tasks than the study has is provisional.")


def report(study: Study) -> list[str]:
    """`randmask report`'s lines (it also rewrites the figures), less its "wrote <file>" notes."""
    return [line for line in run(*report_args(study)).splitlines() if not line.startswith("wrote ")]


def report_args(study: Study, figures: bool = True) -> list[str]:
    """`randmask report`'s arguments for a study's file: its spec marks cells whose LR search is unfinished."""
    return ["report", "--from", study.records, "--spec", study.spec, *(["--figures", study.figures] * figures)]


def findings_args(study: Study) -> list[str]:
    return ["findings", "--from", study.records, "--spec", study.spec]


def shown(args: list[str]) -> str:
    """A command as the pages quote it."""
    return f"`randmask {' '.join(args)}`"


def headline(study: Study, lines: list[str]) -> str:
    """The README's short version: the report's first table (the study's main one), its protocol and legend lines."""
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    notes = [line for line in lines if line.startswith(("Protocols:", "Cells:"))]
    return "\n".join([f"{shown(report_args(study, figures=False))} printed (the main table; the paired differences, "
                      f"figures and the paper's findings are in [the study results]({study.page})):", "",
                      *lines[start:end], "", *notes])


def figure_lines(study: Study, up: str) -> list[str]:
    """Markdown images for the figures the report wrote, that exist."""
    shown = [("lr_curves", "Fig. 3 analogue"), ("structured", "structured vs random"),
             ("sparsity", "Table 5 analogue: test accuracy against the trainable ratio, beside the paper's "
                          "OPT-125m row")]
    return [f"![{alt}]({up}{study.figures}/smollm2-135m_{name}.png)\n" for name, alt in shown
            if (ROOT / study.figures / f"smollm2-135m_{name}.png").is_file()]


def exploratory_section(study: Study, lines: list[str], up: str) -> str:
    """The exploratory study's page section; ``up`` leads from the page to the repository root (for figures)."""
    parts = [status(study), "", progress(study, plan(study)), "",
             f"{shown(report_args(study))} printed:", "", *lines, "",
             *figure_lines(study, up)]
    findings = [*findings_args(study), "--theory", THEORY]
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
                  f"![Fig. 4a analogue]({up}{ANALYSIS}/lambda_max.png) "
                  f"![Fig. 4b analogue]({up}{ANALYSIS}/distance.png)",
                  ""]
        findings += ["--analysis", ANALYSIS]
    parts += [f"{shown(findings)} printed:", "", "```", run(*findings), "```"]
    return "\n".join(parts)


def power_lines(lines: list[str]) -> list[str]:
    """The power calculation's block of `--plan`'s lines (nothing when it has none)."""
    return lines[next((i for i, line in enumerate(lines) if line.startswith("power")), len(lines)):]


def tasks_without_power(study: Study, power: list[str]) -> list[str]:
    """The spec's tasks that no row of the power block covers (they have no paired seeds yet)."""
    covered = {line.strip().split(":")[0] for line in power[1:]}
    return [task for task in json.loads((ROOT / study.spec).read_text())["protocol"] if task not in covered]


def confirm_findings(study: Study) -> str:
    return run(*findings_args(study))


def seeds_lines(planned: list[str]) -> list[str]:
    """`--plan`'s line on the seed count: the re-estimation's decision once it is made, else what it waits for."""
    return [line for line in planned if line.startswith("seeds")]


def confirm_section(study: Study, lines: list[str], found: str, planned: list[str], up: str) -> str:
    """The confirmatory study's page section: compute, progress, seeds and power, report, figures, the rules;
    ``planned``: what `randmask study --plan` printed."""
    own = power_lines(planned)
    missing = tasks_without_power(study, own)
    earlier = power_lines(plan(study, "--power-from", EXPLORATORY.records)) if missing else []
    seeds = seeds_lines(planned)
    count = len(json.loads((ROOT / study.spec).read_text())["seeds"])
    return "\n".join([
        status(study), "", progress(study, planned), "",
        f"The spec plans {count} seeds per cell (the issue's floor is 10). Its `reestimate` rule then sets the seed "
        "count of the cells that rule (a) compares once, from the spread of those planned seeds alone, never their "
        "mean (an internal pilot: see the rules above); `randmask study ... --plan` printed:", "",
        "```", *seeds, *own, "```", "",
        *([f"No paired seeds of {', '.join(missing)} yet: on the exploratory study's spreads (its protocol is "
           "shorter, so a planning figure only) the same calculation printed:", "", "```", *earlier, "```", ""]
          if earlier else []),
        f"{shown(report_args(study))} printed:", "", *lines, "",
        *figure_lines(study, up),
        f"{shown(findings_args(study))} printed:", "", "```", found, "```"])


# The rules whose headline the README shows: those the confirmatory study decides ((a), (e)) and the LR rule its LR
# searches decide ((b)); (c) and (d) read analysis and theory outputs this study does not make.
README_RULES = ("(a)", "(b)", "(e)")


def verdicts(study: Study, lines: list[str], found: str, planned: list[str]) -> str:
    """The README's short version of the confirmatory study: the headline of each rule, the seed count rule (a)
    reads, the rows the paper also reports (Table 1 and Table 5 analogues) from the report's ``lines``, the
    compute spent, the sparsity curve; ``found``: what `randmask findings` printed, ``planned``: `--plan`'s lines."""
    rules = [line for line in found.splitlines() if line.startswith(README_RULES)]
    curve = [line for line in figure_lines(study, "") if "_sparsity.png" in line]
    seeds = seeds_lines(planned)
    return "\n".join([f"{shown(findings_args(study))} printed (rules (a), (b) and (e); the rest, the tables "
                      f"and the curve in [the confirmatory study]({study.page})):", "", "```", *rules, "```", "",
                      *([f"The seed count of rule (a)'s cells: `randmask study {study.spec} --export "
                         f"{study.records} --plan` printed:", "", "```", *seeds, "```", ""] if seeds else []),
                      *beside_the_paper(study, lines), *far_off(lines), status(study), "", *curve])


def far_off(lines: list[str]) -> list[str]:
    """The report's far-off seeds (runs far from their cell, kept in every number), as it printed them; none:
    nothing."""
    start = next((i for i, line in enumerate(lines) if line.startswith("#### Far-off seeds")), None)
    if start is None:
        return []
    listed = [line for line in lines[start + 1:] if line.startswith("- ")]
    return [f"Far-off seeds, from the same report (seeds more than {FAR_OFF_Z:g} robust standard deviations from "
            "their cell's median; real runs, kept in every mean, interval and rule):", "", *listed, ""]


def beside_the_paper(study: Study, lines: list[str]) -> list[str]:
    """The report's table of the rows the paper also reports, ours beside its OPT-125m numbers (none: nothing)."""
    start = next((i for i, line in enumerate(lines) if line.startswith("#### Beside the paper's")), None)
    if start is None:
        return []
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("Paper:"))
    return [f"{shown(report_args(study, figures=False))} printed, among its tables (a cell reads \"LR search "
            "unfinished\" until the study's plan has chosen its LR):", "", *lines[start + 2:end + 1], ""]


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


def update(name: str) -> None:
    study = STUDIES[name]
    if not (ROOT / study.records).is_file():
        print(f"{study.records} does not exist yet: nothing to write for the {name} study")
        return
    lines = report(study)
    if study is EXPLORATORY:
        replace_between(ROOT / study.page, study.page_markers, exploratory_section(study, lines, up="../"))
        replace_between(ROOT / "README.md", study.readme_markers, headline(study, lines))
    else:
        found, planned = confirm_findings(study), plan(study)  # once each, for the page and the README
        replace_between(ROOT / study.page, study.page_markers, confirm_section(study, lines, found, planned, up="../"))
        replace_between(ROOT / "README.md", study.readme_markers, verdicts(study, lines, found, planned))


def main(argv: list[str]) -> int:
    unknown = sorted(set(argv) - set(STUDIES))
    if unknown:
        sys.exit(f"unknown study {unknown[0]!r}; choose from {', '.join(STUDIES)} (or none for both)")
    for name in argv or list(STUDIES):
        update(name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
