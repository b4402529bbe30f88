"""Config files: keys are option names, precedence is flag > file > default, per-pass option tables,
and every mistake is exit 2 with one line naming the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from passes.fuse_1x1_chain import Fuse1x1Chain
from rewriter.cli import app
from rewriter.config import build_passes, load_config
from rewriter.registry import instantiate_pass
from rewriter.contract import Pass
from rewriter.errors import InputError
from rewriter.model import Model

runner = CliRunner()


def invoke(*args: str | Path):  # type: ignore[no-untyped-def]
    return runner.invoke(app, [str(a) for a in args])


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def one_line_error(result) -> str:  # type: ignore[no-untyped-def]
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


class Ranked(Pass):
    """A pass with constructor options, standing in for lossy passes with knobs."""

    name = "ranked"
    summary = "test pass with options"
    exact = False

    def __init__(self, rank: int = 8, modes: tuple[str, ...] = ("output",)) -> None:
        self.rank, self.modes = rank, tuple(modes)

    def find(self, model: Model):  # type: ignore[no-untyped-def]
        return iter(())

    def apply(self, model, candidate) -> None:  # type: ignore[no-untyped-def]
        raise AssertionError


# -- the library part ----------------------------------------------------------------------------------
def test_load_config_splits_options_and_pass_tables(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path / "r.toml", 'threads = 2\nmax-error = "cosine>=0.99"\n[pass-options.ranked]\nrank = 4\nmax-rank = 2\n'))
    assert cfg.options == {"threads": 2, "max-error": "cosine>=0.99"}
    assert cfg.pass_options == {"ranked": {"rank": 4, "max_rank": 2}}  # keyword names: dashes become underscores


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("threads = [", "not valid TOML"),
        ("[passes.fuse_1x1_chain]\nx = 1\n", "per-pass options go in [pass-options.NAME]"),
        ("[pass-options]\nfuse_1x1_chain = 3\n", "[pass-options.fuse_1x1_chain] must be a table"),
        ("[report]\nx = 1\n", "unknown table [report]"),
    ],
)
def test_load_config_errors(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(InputError, match=None) as info:
        load_config(write(tmp_path / "r.toml", text))
    assert expected in str(info.value) and "r.toml" in str(info.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="config file not found"):
        load_config(tmp_path / "nope.toml")


def test_pass_options_reach_the_constructor() -> None:
    table = {"ranked": Ranked, "fuse_1x1_chain": Fuse1x1Chain}
    (p,) = build_passes("ranked", {"ranked": {"rank": 4, "modes": ["input"]}}, available=table)
    assert isinstance(p, Ranked) and p.rank == 4 and p.modes == ("input",)
    # Without a selection: the exact passes of the table; options of an unselected pass are ignored.
    assert [type(x) for x in build_passes(None, {"ranked": {"rank": 2}}, available=table)] == [Fuse1x1Chain]


@pytest.mark.parametrize(
    ("cls", "options", "expected"),
    [
        (Ranked, {"rnak": 3}, "pass 'ranked' has no option 'rnak' (its options: rank, modes)"),
        (Fuse1x1Chain, {"foo": 1}, "pass 'fuse_1x1_chain' has no option 'foo' (it takes no options)"),
    ],
)
def test_unknown_pass_option_is_named(cls: type[Pass], options: dict, expected: str) -> None:
    with pytest.raises(InputError) as info:
        instantiate_pass(cls, options)
    assert str(info.value) == expected


def test_options_for_an_unknown_pass_are_an_error() -> None:
    with pytest.raises(InputError, match=r"\[pass-options.nope\]: unknown pass 'nope'"):
        build_passes(None, {"nope": {}})


# -- the CLI: precedence -------------------------------------------------------------------------------
def test_flags_override_the_file_and_the_file_overrides_defaults(sample_path: Path, tmp_path: Path) -> None:
    folder = tmp_path / "conf"
    folder.mkdir()
    config = write(
        folder / "rewriter.toml",
        "\n".join([
            'passes = ["fuse_1x1_chain"]',
            'input-shape = ["input:1x3x112x112"]',
            "latency = false",      # --no-latency
            "threads = 2",
            "rtol = 1e-3",
            "seed = 5",
            "num-feeds = 3",
            'report = "report.json"',  # relative to the config's folder
            'json = "only-for-analyze.json"',  # an option of other commands: ignored here
        ]) + "\n",
    )
    output = tmp_path / "o.onnx"
    result = invoke("optimize", sample_path, "-o", output, "--config", config, "--rtol", "2e-3", "--seed", "7")
    assert result.exit_code == 0, result.output
    data = json.loads((folder / "report.json").read_text())
    assert data["budget"] == "allclose(rtol=0.002, atol=1e-05)"  # flag beats file
    assert data["feeds"] == "random (seed 7)"                   # flag beats file
    assert data["environment"]["threads"] == 2                  # file beats default (1)
    assert data["totals"]["final_latency"] is None              # latency = false
    assert {d["pass"] for d in data["decisions"]} == {"fuse_1x1_chain"}
    assert not (folder / "only-for-analyze.json").exists()
    # A flag that switches a boolean back on wins over the file too.
    result = invoke("optimize", sample_path, "-o", output, "--config", config, "--latency", "--max-pairs", "4")
    assert result.exit_code == 0, result.output
    assert json.loads((folder / "report.json").read_text())["totals"]["final_latency"] is not None


def test_top_level_options_from_the_file(sample_path: Path, tmp_path: Path) -> None:
    config = write(tmp_path / "r.toml", "quiet = true\nlatency = false\n")
    output = tmp_path / "o.onnx"
    result = invoke("optimize", sample_path, "-o", output, "--config", config)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines() == [f"wrote {output}: 1 rewrite(s) kept, 0 rolled back"]


def test_one_file_serves_optimize_and_apply(sample_path: Path, tmp_path: Path) -> None:
    config = write(tmp_path / "r.toml", 'latency = false\nmax-error = "cosine>=0.999"\nreport = "r.json"\n')
    opt, replayed, plan = tmp_path / "o.onnx", tmp_path / "a.onnx", tmp_path / "plan.json"
    assert invoke("optimize", sample_path, "-o", opt, "--config", config, "--save-plan", plan).exit_code == 0
    result = invoke("apply", sample_path, "--plan", plan, "-o", replayed, "--config", config)
    assert result.exit_code == 0, result.output
    assert replayed.read_bytes() == opt.read_bytes()


# -- the CLI: mistakes are exit 2, one line, naming the key ---------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("bogus = 1\n", "unknown key 'bogus'"),
        ('max_error = "cosine>=0.9"\n', "unknown key 'max_error' (did you mean 'max-error'?)"),
        ('threads = "two"\n', "key 'threads': expected an integer, got 'two'"),
        ("num-feeds = 0\n", "key 'num-feeds': 0 is out of range (>= 1)"),
        ('latency = "no"\n', "key 'latency': expected true or false"),
        ("input-shape = 3\n", "key 'input-shape': expected a string or a list of strings"),
        ('config = "other.toml"\n', "cannot name another config file"),
        ("[pass-options.fuse_1x1_chain]\nfoo = 1\n", "pass 'fuse_1x1_chain' has no option 'foo'"),
        ("[pass-options.nope]\n", "unknown pass 'nope'"),
        ("threads = [\n", "not valid TOML"),
    ],
)
def test_config_mistakes_exit_2(sample_path: Path, tmp_path: Path, text: str, expected: str) -> None:
    config = write(tmp_path / "r.toml", text)
    output = tmp_path / "o.onnx"
    line = one_line_error(invoke("optimize", sample_path, "-o", output, "--no-latency", "--config", config))
    assert expected in line
    assert not output.exists()


def test_missing_config_exits_2(sample_path: Path, tmp_path: Path) -> None:
    line = one_line_error(invoke("analyze", sample_path, "--config", tmp_path / "nope.toml"))
    assert "config file not found" in line


def test_every_command_option_is_a_config_key() -> None:
    """Keys are derived from the options themselves, so every option of every command has one."""
    import typer

    from rewriter.config import option_key

    group = typer.main.get_command(app)
    for name, command in group.commands.items():  # type: ignore[attr-defined]
        options = [p for p in command.params if p.param_type_name == "option"]
        keys = [option_key(p) for p in options]
        assert all(keys), (name, [p.name for p, k in zip(options, keys) if not k])
        assert len(set(keys)) == len(keys), name
