"""No data loss: inputs stay byte-identical, outputs appear whole or not at all, even when the writer is killed.

* every command leaves the input model and its data file byte-identical (sha256) and its folder untouched;
* an output is refused when it would replace the input model or one of its data files, unless
  ``--in-place``; a symbolic link at the output is replaced (its target never written), with a warning;
* a save killed with SIGKILL at random moments leaves at the output either the old model or the complete
  new one -- for external data, the old pair, no model, or the new pair, never the old model over new
  data -- and the next save removes the temporary files the killed one left.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from rewriter.cli import app
from rewriter.io import load_model, save_model, sha256_file
from tests.helpers import assert_same_outputs

runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent


def invoke(*args: str | Path):  # type: ignore[no-untyped-def]
    return runner.invoke(app, [str(a) for a in args])


def tree(folder: Path) -> dict[str, str]:
    """sha256 of every regular file under ``folder`` (links shown as links)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            out[str(path.relative_to(folder))] = "-> " + os.readlink(path)
        elif path.is_file():
            out[str(path.relative_to(folder))] = sha256_file(path)
    return out


@pytest.fixture()
def external_input(tmp_path: Path, sample_model: onnx.ModelProto) -> Path:
    """The sample model saved as ``in/m.onnx`` + ``in/m.onnx.data``."""
    folder = tmp_path / "in"
    folder.mkdir()
    return save_model(sample_model, folder / "m.onnx", external_data=True)


# -- inputs are never modified ---------------------------------------------------------------------------
def test_every_command_leaves_the_input_byte_identical(external_input: Path, tmp_path: Path) -> None:
    folder = external_input.parent
    before = tree(folder)
    assert set(before) == {"m.onnx", "m.onnx.data"}
    out = tmp_path / "out"
    out.mkdir()
    runs = [
        (["analyze", external_input], 0),
        (["optimize", external_input, "-o", out / "a.onnx", "--no-latency"], 0),
        (["optimize", external_input, "-o", out / "b.onnx", "--no-latency", "--external-data"], 0),
        (["optimize", external_input, "-o", out / "c.onnx", "--no-latency", "--passes", "no_such_pass"], 2),
        (["optimize", external_input, "-o", out / "missing" / "d.onnx", "--no-latency"], 2),
        (["validate", external_input, external_input, "--no-latency", "--num-feeds", "2"], 0),
    ]
    for args, code in runs:
        result = invoke(*args)
        assert result.exit_code == code, (args, result.output)
        assert tree(folder) == before, args  # same bytes, no temporary or extra file
    assert sorted(p.name for p in out.iterdir()) == ["a.onnx", "b.onnx", "b.onnx.data"]


@pytest.mark.parametrize("target", ["model", "data", "data of output"])
def test_output_over_an_input_file_needs_in_place(target: str, external_input: Path, sample_model: onnx.ModelProto) -> None:
    folder = external_input.parent
    if target == "data of output":
        # The input's data file is named like the data file of the requested output.
        proto = onnx.load(str(external_input), load_external_data=False)
        for t in proto.graph.initializer:
            for e in t.external_data:
                if e.key == "location":
                    e.value = "opt.onnx.data"
        external_input.write_bytes(proto.SerializeToString())
        os.replace(folder / "m.onnx.data", folder / "opt.onnx.data")
    output = {"model": external_input, "data": folder / "m.onnx.data", "data of output": folder / "opt.onnx"}[target]
    before = tree(folder)
    result = invoke("optimize", external_input, "-o", output, "--no-latency")
    assert result.exit_code == 2, result.output
    assert "--in-place" in result.stderr and result.stderr.count("\n") == 1
    assert tree(folder) == before


def test_in_place_with_external_data_replaces_model_and_data_together(external_input: Path, sample_model: onnx.ModelProto) -> None:
    result = invoke("optimize", external_input, "-o", external_input, "--in-place", "--external-data", "--no-latency")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in external_input.parent.iterdir()) == ["m.onnx", "m.onnx.data"]
    optimized = load_model(external_input)
    assert len(optimized.graph.node) == len(sample_model.graph.node) - 1
    assert_same_outputs(sample_model, optimized)


def test_symlink_at_the_output_is_replaced_not_written_through(sample_path: Path, tmp_path: Path) -> None:
    precious = tmp_path / "precious.onnx"
    precious.write_bytes(b"someone else's file")
    precious_data = tmp_path / "precious.data"
    precious_data.write_bytes(b"someone else's data")
    output = tmp_path / "out.onnx"
    output.symlink_to(precious)
    (tmp_path / "out.onnx.data").symlink_to(precious_data)
    result = invoke("optimize", sample_path, "-o", output, "--no-latency", "--external-data")
    assert result.exit_code == 0, result.output
    warnings = result.stderr.strip().splitlines()
    assert len(warnings) == 2 and all("is a symbolic link" in line for line in warnings), result.stderr
    assert precious.read_bytes() == b"someone else's file"
    assert precious_data.read_bytes() == b"someone else's data"
    assert not output.is_symlink() and not (tmp_path / "out.onnx.data").is_symlink()
    load_model(output)


def test_output_file_mode_follows_the_umask(sample_model: onnx.ModelProto, tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        path = save_model(sample_model, tmp_path / "m.onnx", external_data=True)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # not mkstemp's 0600
    assert stat.S_IMODE((tmp_path / "m.onnx.data").stat().st_mode) == 0o640


# -- the order of an overwriting save --------------------------------------------------------------------
def test_overwriting_external_output_moves_the_old_model_aside_first(
    sample_model: onnx.ModelProto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = save_model(sample_model, tmp_path / "m.onnx", external_data=True)
    calls: list[tuple[str, str]] = []
    real_replace, real_link = os.replace, os.link

    def replace(src, dst):  # type: ignore[no-untyped-def]
        calls.append(("replace", Path(src).name, Path(dst).name))
        real_replace(src, dst)

    def link(src, dst):  # type: ignore[no-untyped-def]
        calls.append(("link", Path(src).name, Path(dst).name))
        real_link(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "link", link)
    save_model(sample_model, path, external_data=True)
    kinds = [(c[0], c[1] if not c[1].startswith(".") else c[1].split(".")[1] + "-tmp", c[2] if not c[2].startswith(".") else "aside") for c in calls]
    # Old data kept by a hard link, old model moved aside, then new data, then new model.
    assert kinds == [
        ("link", "m.onnx.data", "aside"),
        ("replace", "m.onnx", "aside"),
        ("replace", "m-tmp", "m.onnx.data"),
        ("replace", "m-tmp", "m.onnx"),
    ], calls
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.data"]  # the aside files are gone
    load_model(path)


def test_stale_temporary_files_of_dead_writers_are_removed_by_the_next_save(
    sample_model: onnx.ModelProto, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = os.getppid()
    names = [f".m.onnx.{dead.pid}.abc123.tmp", f".m.onnx.data.{dead.pid}.k_9.tmp", f".m.onnx.{live}.xyz.tmp",
             f".m.onnx.{dead.pid}.old1.old", ".other.onnx.1.abc.tmp", "m.onnx.backup"]
    for name in names:
        (tmp_path / name).write_bytes(b"leftover")
    with caplog.at_level(logging.WARNING, logger="rewriter"):
        save_model(sample_model, tmp_path / "m.onnx")
    left = sorted(os.listdir(tmp_path))
    assert left == sorted(["m.onnx", f".m.onnx.{live}.xyz.tmp", f".m.onnx.{dead.pid}.old1.old", ".other.onnx.1.abc.tmp", "m.onnx.backup"])
    assert any("interrupted save" in r.getMessage() for r in caplog.records)  # the .old file is reported, kept


# -- killed mid-write ------------------------------------------------------------------------------------
WRITER = textwrap.dedent(
    """
    import sys
    import onnx
    from rewriter.io import save_model
    src, out, external = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    model = onnx.load(src)
    sys.stdout.write("ready\\n")
    sys.stdout.flush()
    sys.stdin.readline()
    save_model(model, out, external_data=external)
    sys.stdout.write("done\\n")
    sys.stdout.flush()
    """
)


def big_model(value: float, megabytes: int) -> onnx.ModelProto:
    n = megabytes * (1 << 20) // 4
    weight = numpy_helper.from_array(np.full(n, value, dtype=np.float32), "W")
    graph = helper.make_graph([helper.make_node("Add", ["x", "W"], ["y"])], "big",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n])], [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _writer(src: Path, out: Path, external: bool) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", WRITER, str(src), str(out), "1" if external else "0"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def _state(folder: Path, external: bool) -> tuple[str | None, str | None]:
    model = folder / "out.onnx"
    data = folder / "out.onnx.data"
    return (sha256_file(model) if model.exists() else None, sha256_file(data) if external and data.exists() else None)


@pytest.mark.parametrize(
    ("external", "megabytes"),
    [(False, 48), (True, 16), pytest.param(False, 256, marks=pytest.mark.slow), pytest.param(True, 128, marks=pytest.mark.slow)],
    ids=["inline-48MB", "external-16MB", "inline-256MB", "external-128MB"],
)
def test_killed_save_leaves_the_old_output_or_the_complete_new_one(external: bool, megabytes: int, tmp_path: Path) -> None:
    kills = 10
    sources, refs = [], []
    for value in (1.0, 2.0):
        model = big_model(value, megabytes)
        src = tmp_path / f"src{int(value)}.onnx"
        src.write_bytes(model.SerializeToString())
        ref = tmp_path / f"ref{int(value)}"
        ref.mkdir()
        save_model(model, ref / "out.onnx", external_data=external)
        sources.append(src)
        refs.append(_state(ref, external))
    complete = {refs[0], refs[1]}
    folder = tmp_path / "out"
    folder.mkdir()
    output = folder / "out.onnx"
    save_model(onnx.load(str(sources[0])), output, external_data=external)
    assert _state(folder, external) == refs[0]

    # Calibrate: how long one uninterrupted save takes here.
    writer = _writer(sources[1], output, external)
    assert writer.stdout is not None and writer.stdout.readline() == "ready\n"
    start = time.perf_counter()
    writer.communicate("go\n", timeout=120)
    duration = time.perf_counter() - start
    assert _state(folder, external) == refs[1]

    rng = random.Random(0)
    outcomes = []
    # Writers start (import, load their model) ahead of their turn: a few at a time for big models.
    ahead = kills if megabytes <= 64 else 2
    queue = [_writer(sources[i % 2], output, external) for i in range(ahead)]
    for i in range(kills):
        target = i % 2
        writer = queue.pop(0)
        assert writer.stdout is not None and writer.stdout.readline() == "ready\n"
        before = _state(folder, external)
        writer.stdin.write("go\n")  # type: ignore[union-attr]
        writer.stdin.flush()  # type: ignore[union-attr]
        if i + ahead < kills:
            queue.append(_writer(sources[(i + ahead) % 2], output, external))
        time.sleep(rng.uniform(0.0, duration))
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=60)
        after = _state(folder, external)
        if external:
            # Old pair, new pair, or (the old model moved aside) no model -- never a mixed pair.
            assert after in complete or after[0] is None, (i, after)
        else:
            assert after in complete, (i, after)
        outcomes.append("old" if after == before else "new" if after == refs[target] else "none")
    # Whatever the kills left behind, one complete save cleans up the temporary files and works.
    save_model(onnx.load(str(sources[0])), output, external_data=external)
    assert _state(folder, external) == refs[0]
    assert not [p for p in os.listdir(folder) if p.endswith(".tmp")]
    sys.stderr.write(f"kill outcomes ({duration:.2f} s per save): {outcomes}\n")
