"""The documentation: the site builds with ``mkdocs build --strict`` (a broken internal link or anchor is a
warning, and a warning fails the build, as ``make docs`` does), and the README's and the pages' relative
links point to files that exist and to headings those files have, as the repository host renders them.

MkDocs missing is a failure, not a skip: it is in the ``dev`` extra, and a test run without it would pass
with the links unchecked."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

_LINK = re.compile(r"(?<!\!)\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^```.*?^```", re.S | re.M)
_CODE_SPAN = re.compile(r"`[^`\n]*`")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)


def _text(path: Path) -> str:
    """The Markdown of ``path`` without its fenced code blocks (a ``](`` in code is not a link)."""
    return _FENCE.sub("", path.read_text(encoding="utf-8"))


def _host_slug(heading: str) -> str:
    """The anchor the repository host gives a heading: lower case, punctuation but ``-`` and ``_`` dropped,
    each space a hyphen."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    return {_host_slug(h) for h in _HEADING.findall(_text(path))}


def _relative_links(path: Path) -> list[tuple[str, str]]:
    """(file part, anchor) of every relative link on the page (none in code)."""
    out = []
    for url in _LINK.findall(_CODE_SPAN.sub("", _text(path))):
        if "://" in url or url.startswith("mailto:"):
            continue
        file_part, _, anchor = url.partition("#")
        out.append((file_part, anchor))
    return out


def _broken(path: Path) -> list[str]:
    problems = []
    for file_part, anchor in _relative_links(path):
        target = (path.parent / file_part).resolve() if file_part else path
        if not target.exists():
            problems.append(f"{path.relative_to(ROOT)}: link to {file_part!r}: no such file")
        elif not target.is_relative_to(ROOT):
            problems.append(f"{path.relative_to(ROOT)}: link to {file_part!r} leaves the repository")
        elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
            problems.append(f"{path.relative_to(ROOT)}: link to {file_part}#{anchor}: no such heading")
    return problems


def test_docs_site_builds_strict_without_warnings(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"mkdocs build --strict failed (is mkdocs installed? it is in the dev extra):\n{log}"
    warnings = [line for line in log.splitlines() if "WARNING" in line]
    assert not warnings, "\n".join(warnings)
    assert (tmp_path / "site" / "index.html").is_file()


def test_readme_relative_links_exist():
    readme = ROOT / "README.md"
    links = _relative_links(readme)
    assert links, "the README links to no page"
    assert not _broken(readme), "\n".join(_broken(readme))


def test_pages_relative_links_and_anchors_hold_on_the_repository_host():
    """MkDocs checks the site's anchors with its own slugs; the same links must also work where the
    pages are read in the repository."""
    problems = [p for page in sorted(DOCS.glob("*.md")) for p in _broken(page)]
    assert not problems, "\n".join(problems)


def test_readme_is_short_and_quick_start_comes_first():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) < 170
    sections = re.findall(r"^## (.+)$", _FENCE.sub("", text), re.M)
    assert [s.split()[0].lower() for s in sections[:2]] == ["install", "quick"], sections
    assert "onnx-bottleneck optimize model.onnx -o model.opt.onnx --report r.json --html r.html" in text
