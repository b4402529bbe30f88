"""Option groups: each flag is declared once, shown under its group's panel, and parsed into the group's
object; commands that share a group get the same flags and the same object."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from rewriter.cli import app
from rewriter.cli.groups import BUDGET, FEEDS, MODEL, OUTPUT, SEARCH, TIMING, Flag, Group, compose
from rewriter.options import BudgetOptions, FeedOptions, MeasureOptions, SearchOptions

runner = CliRunner()


def _options(command: str) -> dict[str, Any]:
    group = typer.main.get_command(app)
    return {p.name: p for p in group.commands[command].params}  # type: ignore[attr-defined]


@pytest.mark.parametrize("command", ["optimize", "optimize-many"])
def test_optimize_commands_carry_every_flag_of_their_groups(command: str) -> None:
    params = _options(command)
    for group in (MODEL, FEEDS, BUDGET, TIMING, SEARCH):
        for flag in group.flags:
            assert flag.name in params, (command, flag.name)
            assert params[flag.name].opts[0] == flag.decls[0].split("/")[0]


def test_group_defaults_are_the_library_defaults() -> None:
    """A flag's default is the default of the field it fills, so the CLI and the Python API agree."""
    for group, kind in ((FEEDS, FeedOptions), (BUDGET, BudgetOptions), (TIMING, MeasureOptions), (SEARCH, SearchOptions)):
        built = group.build(**{f.name: f.default for f in group.flags})
        assert built == kind(), group.panel


def test_help_shows_one_panel_per_group(sample_path: Path) -> None:
    result = runner.invoke(app, ["optimize", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for panel in ("Inputs and shapes", "Data", "Budget", "Latency", "Search", "Output"):
        assert f" {panel} " in result.stdout, panel


def test_compose_hands_the_command_one_object_per_group() -> None:
    seen: dict[str, Any] = {}
    tiny = Group("Tiny", (Flag("rank", int, 8, ("--rank",), "A rank."), Flag("name", str, "x", ("--name",))), lambda **v: v)

    @compose(opts=tiny.but(rank={"default": 4}))
    def command(path: str = typer.Argument(...), *, opts: dict[str, Any]) -> None:
        seen.update(opts=opts, path=path)

    one = typer.Typer()
    one.command()(command)
    result = runner.invoke(one, ["p", "--name", "y"])
    assert result.exit_code == 0, result.output
    assert seen == {"opts": {"rank": 4, "name": "y"}, "path": "p"}


def test_compose_refuses_a_flag_declared_twice() -> None:
    with pytest.raises(TypeError, match="declared twice"):
        @compose(a=FEEDS, b=FEEDS.only("seed"))
        def command(*, a: FeedOptions, b: FeedOptions) -> None: ...


def test_only_and_but_name_real_flags() -> None:
    with pytest.raises(ValueError, match="no flag"):
        OUTPUT.only("nope")
    with pytest.raises(ValueError, match="no flag"):
        OUTPUT.but(nope={"help": None})
