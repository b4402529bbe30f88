"""The version has one home, ``rewriter.version``: the package, the build metadata and the reports read it."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import rewriter
from rewriter.report import environment
from rewriter.version import __version__

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_the_package_re_exports_the_version_module() -> None:
    assert re.fullmatch(r"\d+\.\d+\.\d+", __version__)
    assert rewriter.__version__ == __version__


def test_pyproject_reads_the_version_from_the_version_module() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "rewriter.version.__version__"}


def test_report_environment_names_the_tool_version() -> None:
    assert environment("cpu", 1)["tool_version"] == __version__
