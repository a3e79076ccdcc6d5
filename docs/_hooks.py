"""mkdocs hook: pages may link files of the repository outside docs/ (the study's figures), as on GitHub.

A page's markdown uses the path that works on GitHub (``../experiments/results/x.png`` from docs/), so the
same file reads right in both places. mkdocs only knows files under docs/, so this hook adds each such file
to the build (copied under the site at its repository path) and points the link there; mkdocs then checks
the link like any other. A link that leaves the repository, or names a missing file, is left as it is, and
strict mode fails on it.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File, Files, InclusionLevel

# ](target) or ](target "title") of a markdown link or image; targets with a scheme or an anchor only are skipped
LINK = re.compile(r"(\]\()([^)\s#]+)((?:#[^)\s]*)?(?:\s+\"[^\"]*\")?\))")


def _outside_docs(target: str, page_src: Path, docs: Path, root: Path) -> Path | None:
    """The repository file a relative link names, when it lies outside docs/ (else None)."""
    if "://" in target or target.startswith(("/", "mailto:")):
        return None
    path = (page_src.parent / target).resolve()
    if not path.is_file() or docs in path.parents or root not in path.parents or path.suffix == ".md":
        return None
    return path


def on_page_markdown(markdown: str, page, config, files: Files) -> str:
    docs = Path(config["docs_dir"]).resolve()
    root = Path(config["config_file_path"]).resolve().parent
    page_src = Path(page.file.abs_src_path)

    def rewrite(match: re.Match) -> str:
        path = _outside_docs(match.group(2), page_src, docs, root)
        if path is None:
            return match.group(0)
        uri = path.relative_to(root).as_posix()  # the file's place in the site: its repository path
        if files.get_file_from_path(uri) is None:
            files.append(File(uri, src_dir=str(root), dest_dir=config["site_dir"],
                              use_directory_urls=config["use_directory_urls"], inclusion=InclusionLevel.INCLUDED))
        relative = posixpath.relpath(uri, posixpath.dirname(page.file.src_uri) or ".")
        return f"{match.group(1)}{relative}{match.group(3)}"

    return LINK.sub(rewrite, markdown)
