"""The README and the study pages show what the committed records print now (issue 26: no number in the README
that a command of the project did not print, and none left stale by the records committed after it).

Checked: every part that depends on the records alone (tables, verdicts, the seed count, the rows beside the
paper, the compute line). The plan's prices are left out: they depend on the kind of CPU that prints them."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "experiments" / "update_readme_study.py"
FIX = "run `python experiments/update_readme_study.py` and commit what it rewrites"


def _module():
    spec = importlib.util.spec_from_file_location("update_readme_study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_readme_and_pages_show_what_the_committed_records_print():
    u = _module()
    readme = (ROOT / "README.md").read_text()
    for study in (u.EXPLORATORY, u.CONFIRM):
        page = (ROOT / study.page).read_text()
        lines = u.run(*u.report_args(study, figures=False)).splitlines()
        assert "\n".join(lines) in page, f"{study.page} does not show {study.records}'s tables as they are: {FIX}"
        assert u.status(study) in page, f"{study.page}'s compute line is stale: {FIX}"
        if study is u.EXPLORATORY:
            shown = [u.headline(study, lines)]
        else:
            rules = [line for line in u.confirm_findings(study).splitlines() if line.startswith(u.README_RULES)]
            seeds = u.seeds_lines(u.plan(study))  # the re-estimated seed count reads the records alone
            shown = [*rules, *seeds, "\n".join(u.beside_the_paper(study, lines)).strip(),
                     "\n".join(u.far_off(lines)).strip(), u.status(study)]
        for part in shown:
            assert part in readme, f"README.md does not show what {study.records} prints now ({part[:60]}...): {FIX}"
