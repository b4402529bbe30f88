"""MkDocs hook (mkdocs.yml ``hooks:``): links from the pages to repository files outside ``docs/``.

The pages are read in two places: on the repository host, where ``docs/report.md`` linking to
``../examples/rewriter.toml`` is right, and in the built site, where MkDocs knows only ``docs/`` and would
call that link not found. This hook keeps the one spelling that works on the host: a relative link whose
target leaves ``docs/`` but lies in the repository is checked to exist, the file is copied into the site
under ``repo/<its path>``, and the link is pointed there. A link to a file that does not exist is left
alone, so MkDocs warns about it and ``mkdocs build --strict`` fails.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File

#: ``[text](target)`` and ``![alt](target)``: the target up to whitespace or the closing parenthesis.
_LINK = re.compile(r"(\]\()([^)\s]+)(\))")
_PREFIX = "repo"

#: page src_uri -> {link path as written -> src_uri of the copy in the site}
_rewrites: dict[str, dict[str, str]] = {}


def _outside_target(page_src: str, path: str, docs: Path, root: Path) -> str | None:
    """The repository-relative path of an existing file outside ``docs/`` that ``path`` (as written on the
    page ``page_src``) points to, or ``None`` when it points elsewhere (inside docs/, off the repository,
    an external URL, a file that does not exist)."""
    if not path or "://" in path or path.startswith(("#", "/", "mailto:")):
        return None
    target = Path(posixpath.normpath((docs / page_src).parent.joinpath(path).as_posix()))
    if target.is_relative_to(docs) or not target.is_relative_to(root) or not target.is_file():
        return None
    return target.relative_to(root).as_posix()


def on_files(files, config):
    docs = Path(config.docs_dir).resolve()
    root = Path(config.config_file_path).resolve().parent
    _rewrites.clear()
    for page in files.documentation_pages():
        text = Path(page.abs_src_path).read_text(encoding="utf-8")
        for _, url, _ in _LINK.findall(text):
            path = url.split("#", 1)[0]
            rel = _outside_target(page.src_uri, path, docs, root)
            if rel is None:
                continue
            copy = f"{_PREFIX}/{rel}"
            if files.get_file_from_path(copy) is None:
                files.append(File.generated(config, copy, abs_src_path=str(root / rel)))
            _rewrites.setdefault(page.src_uri, {})[path] = copy
    return files


def on_page_markdown(markdown, page, config, files):
    mapping = _rewrites.get(page.file.src_uri)
    if not mapping:
        return markdown
    here = posixpath.dirname(page.file.src_uri) or "."

    def point(m: re.Match) -> str:
        path, sep, anchor = m.group(2).partition("#")
        if path not in mapping:
            return m.group(0)
        return f"{m.group(1)}{posixpath.relpath(mapping[path], here)}{sep}{anchor}{m.group(3)}"

    return _LINK.sub(point, markdown)
