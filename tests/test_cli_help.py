"""A CLI that guides: every command's --help sorts its options into panels and ends with examples that are
real command lines; ``-v`` gives one plain line per decision, fit for CI logs."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from rewriter.cli import GLOBAL_FLAGS, app, hoist_global_flags
from rewriter.cli.examples import EXAMPLES
from rewriter.cli.groups import PANEL_ORDER

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def commands() -> dict[str, typer.core.TyperCommand]:
    return typer.main.get_command(app).commands  # type: ignore[attr-defined, no-any-return]


def test_every_command_has_examples() -> None:
    assert set(EXAMPLES) == set(commands())


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_help_lists_panels_and_ends_with_the_examples(name: str) -> None:
    result = runner.invoke(app, [name, "--help"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "Examples" in text
    for what, line in EXAMPLES[name]:
        assert what in text and line in text, line
    panels = [m.group(1) for m in re.finditer(r"^╭─ (.+?) ─", text, re.M)]
    ours = [p for p in panels if p in PANEL_ORDER]
    assert ours == sorted(ours, key=PANEL_ORDER.index), panels  # the panels in one order everywhere
    if any(p.opts[0].startswith("--") and p.name not in ("config_file",) for p in commands()[name].params):
        assert ours, f"{name}: options outside the named panels"


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_examples_name_only_options_their_command_has(name: str) -> None:
    opts = {o for p in commands()[name].params for o in (*p.opts, *p.secondary_opts)} | set(GLOBAL_FLAGS)
    for _, line in EXAMPLES[name]:
        argv = hoist_global_flags(shlex.split(line)[1:])
        assert name in argv, line
        used = {a.split("=")[0] for a in argv if a.startswith("-")}
        assert used <= opts, (line, used - opts)


def test_verbose_gives_one_plain_line_per_decision(sample_path: Path, tmp_path: Path) -> None:
    """-v after the command, stderr not a terminal: one line per judged candidate, no escape codes."""
    report = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, "-m", "rewriter.cli", "optimize", str(sample_path), "-o", str(tmp_path / "o.onnx"),
         "--passes", "fuse_1x1_chain,bottleneck", "--max-error", "cosine>=0.99", "--no-screen", "--max-pairs", "4",
         "--report", str(report), "-v"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "\x1b" not in proc.stderr and "\x1b" not in proc.stdout
    pattern = re.compile(r"^onnx-bottleneck: (fuse_1x1_chain|bottleneck): (kept|rolled back) (.+) \[nodes ([^\]]+)\] -- "
                         r"([a-z_]+)(: .+)?; speedup (\d+\.\d{3}x \[\d+\.\d{3}, \d+\.\d{3}\] \((subgraph|model)\)|not measured)$")
    lines = [m for m in map(pattern.match, proc.stderr.splitlines()) if m]
    tried = [d for d in json.loads(report.read_text())["decisions"] if not d["outcome"].startswith("not_tried")]
    assert len(lines) == len(tried) >= 2
    for m, d in zip(lines, tried):
        assert m.group(1) == d["pass"] and m.group(4) == ", ".join(d["nodes"])
        assert (m.group(2) == "kept") == (m.group(5) in ("kept", "superseded"))
    assert any(m.group(2) == "kept" for m in lines) and any(m.group(2) == "rolled back" for m in lines)
