"""Every relative link in README.md and docs/*.md names a file that exists, as GitHub resolves it.

`mkdocs build --strict` (make docs) checks the site's links too, but only where mkdocs is installed and only
for docs/; this checks the README as well, in the default test suite.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# ](target) of a markdown link or image, with an optional "title"; fenced code is removed before matching
LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)


def relative_links(page: Path) -> list[str]:
    """The relative targets (anchor stripped) of the links on ``page``, outside code blocks and code spans."""
    text = re.sub(r"`[^`\n]*`", "", FENCE.sub("", page.read_text()))
    targets = [m.group(1) for m in LINK.finditer(text)]
    return [t.split("#", 1)[0] for t in targets
            if not re.match(r"^[a-z][a-z0-9+.-]*:", t) and not t.startswith(("#", "/"))]


def test_the_pages_exist_and_link_something() -> None:
    assert len(PAGES) > 5 and all(relative_links(page) for page in PAGES[:2])


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_names_an_existing_file(page: Path) -> None:
    missing = [t for t in relative_links(page) if not (page.parent / t).is_file()]
    assert missing == [], f"{page.relative_to(ROOT)} links missing files: {missing}"


def test_the_checker_sees_a_broken_link(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("[a](there.md) ![b](img/x.png \"t\") [c](https://x.org/y) [d](#anchor) `[e](code.md)`\n"
                    "```\n[f](fenced.md)\n```\n")
    assert relative_links(page) == ["there.md", "img/x.png"]
