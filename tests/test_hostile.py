"""The hostile-model suite: every case of ``tests/hostile.py`` through the CLI, in a child process, with a time limit.

Each case runs ``analyze`` and ``optimize -o OUT --no-latency``. Refused cases must exit 2 with exactly one
line on stderr naming the problem, write nothing and leave every input byte-identical; handled cases (valid
but unusual models) must exit 0 and leave the unusual parts untouched. Never a traceback, never a hang.

The children are forked from a server process (:func:`serve`) that has imported the tool once, and run
``rewriter.cli.main`` -- the function the ``onnx-bottleneck`` console script calls -- with their own argv,
stdout and stderr: the same code path as the installed script, without paying its import time a hundred
times. ``test_console_script`` runs a few cases through the installed script itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import signal
import stat
import subprocess
import sys
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.hostile import CASES, Handled, Refused

TIME_LIMIT_S = 60
COMMANDS = ("analyze", "optimize")
#: Imported once by the server, before it forks a child per run.
PRELOAD = ("rewriter.cli", "rewriter.pipeline", "rewriter.analysis", "rewriter.report", "rewriter.gate", "rewriter.progress",
           "rewriter.config", "rewriter.plan", "rewriter.html_report", "rewriter.validation.compare", "passes", "onnxruntime", "typer._adapters")


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


def serve() -> None:
    """The fork server: import the tool once, then fork one child per request read from stdin.

    Request (one JSON line): ``{"argv": [...], "stdout": PATH, "stderr": PATH}``. Replies (JSON lines):
    ``{"pid": N}`` once the child runs, then ``{"exit": CODE}`` when it has ended (killed: ``-SIGNAL``).
    """
    import importlib

    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:  # an optional module: the child imports what it needs anyway
            pass
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:  # the child: its own stdout/stderr files and argv, then the console script's entry point
            code = 1
            try:
                for fd, path, flags in ((0, os.devnull, os.O_RDONLY),
                                        (1, request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                                        (2, request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
                    target = os.open(path, flags, 0o644)
                    os.dup2(target, fd)
                    os.close(target)
                channel.close()
                sys.argv = ["onnx-bottleneck", *request["argv"]]
                from rewriter.cli import main

                try:
                    main()
                    code = 0
                except SystemExit as exc:
                    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        channel.write(json.dumps({"pid": pid}) + "\n")
        _, status = os.waitpid(pid, 0)
        channel.write(json.dumps({"exit": os.waitstatus_to_exitcode(status)}) + "\n")


class CliServer:
    """Client side of :func:`serve`: runs the CLI in a forked child with a time limit."""

    def __init__(self) -> None:
        root = Path(__file__).resolve().parent.parent
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
               "COLUMNS": "200", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from tests.test_hostile import serve; serve()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=root, env=env, text=True, bufsize=1,
        )

    def _reply(self, timeout: float | None) -> dict | None:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the CLI fork server died")
        return json.loads(line)

    def run(self, args: list[str], workdir: Path, timeout: float = TIME_LIMIT_S) -> Run:
        assert self.proc.stdin is not None
        out, err = workdir / "stdout.txt", workdir / "stderr.txt"
        self.proc.stdin.write(json.dumps({"argv": args, "stdout": str(out), "stderr": str(err)}) + "\n")
        started = self._reply(TIME_LIMIT_S)
        assert started is not None, "the CLI fork server does not answer"
        ended = self._reply(timeout)
        if ended is None:
            os.kill(started["pid"], signal.SIGKILL)
            self._reply(None)
            pytest.fail(f"onnx-bottleneck {' '.join(args)} still running after {timeout} s (a hang)")
        return Run(ended["exit"], out.read_text(errors="replace"), err.read_text(errors="replace"))

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def cli() -> Iterator[CliServer]:
    server = CliServer()
    yield server
    server.close()


def snapshot(folder: Path) -> dict[str, str]:
    """Every entry under ``folder`` (not following links): sha256 for regular files, the kind otherwise."""
    state = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root, name)
            mode = path.lstat().st_mode
            if stat.S_ISREG(mode):
                state[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                state[str(path.relative_to(folder))] = "link -> " + os.readlink(path) if stat.S_ISLNK(mode) else oct(stat.S_IFMT(mode))
    return state


def test_the_suite_has_at_least_30_cases() -> None:
    assert len(CASES) >= 30


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("name", list(CASES))
def test_hostile_case(name: str, command: str, tmp_path: Path, cli: CliServer) -> None:
    cases, scratch = tmp_path / "case", tmp_path / "scratch"
    cases.mkdir()
    scratch.mkdir()
    case = CASES[name](cases)
    output = cases / "out.onnx"
    before = snapshot(cases)
    args = ["analyze", str(case.model)] if command == "analyze" else ["optimize", str(case.model), "-o", str(output), "--no-latency"]
    run = cli.run([*args, *case.options], scratch)

    assert "Traceback" not in run.stdout + run.stderr, run.stderr
    lines = run.stderr.strip().splitlines()
    if isinstance(case.expect, Refused):
        assert run.returncode == 2, (run.returncode, run.stdout[-2000:], run.stderr)
        assert len(lines) == 1, run.stderr
        assert lines[0].startswith("error: ") and case.expect.message in lines[0], lines[0]
        assert snapshot(cases) == before  # inputs byte-identical, no output, no temporary file
        return

    assert isinstance(case.expect, Handled)
    assert run.returncode == 0, (run.returncode, run.stdout[-2000:], run.stderr)
    if command == "optimize" and case.expect.warning is not None:
        assert len(lines) == 1 and case.expect.warning in lines[0], run.stderr
    else:
        assert lines == [], run.stderr
    after = snapshot(cases)
    if command == "optimize":
        assert after.pop("out.onnx")
        case.expect.check(case.model, output)
    assert after == before  # inputs byte-identical, nothing else written


@pytest.mark.parametrize("name", ["fifo_as_model", "ext_hard_link", "custom_domain_op"])
def test_console_script(name: str, tmp_path: Path) -> None:
    """A few cases through the installed ``onnx-bottleneck`` script itself, in a plain subprocess."""
    script = Path(sys.executable).parent / "onnx-bottleneck"
    if not script.exists():
        pytest.skip("onnx-bottleneck console script is not installed next to this Python")
    case = CASES[name](tmp_path)
    before = snapshot(tmp_path)
    proc = subprocess.run([str(script), "analyze", str(case.model)], capture_output=True, text=True, timeout=TIME_LIMIT_S)
    assert "Traceback" not in proc.stderr
    if isinstance(case.expect, Refused):
        assert proc.returncode == 2
        assert proc.stderr.count("\n") == 1 and case.expect.message in proc.stderr
    else:
        assert proc.returncode == 0 and proc.stderr == ""
    assert snapshot(tmp_path) == before


@pytest.mark.slow
def test_model_over_the_2gib_protobuf_limit(tmp_path: Path, cli: CliServer) -> None:
    """A 2.2 GB weight in a sparse external data file (nothing near 2 GiB is written to disk).

    ``analyze`` loads it -- the checker runs on a copy without the big weight, shape inference on dims
    only -- and counts its parameters; ``--max-model-bytes`` refuses it before reading any data.
    """
    import onnx
    from onnx import TensorProto, helper

    columns = 140_000_000  # [4, 140e6] float32: 2.24e9 bytes
    weight = onnx.TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[4, columns])
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "big.data"), ("offset", "0"), ("length", str(4 * 4 * columns))):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "big",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, columns])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "big.onnx"
    path.write_bytes(model.SerializeToString())
    with open(tmp_path / "big.data", "wb") as fh:
        fh.truncate(4 * 4 * columns)  # sparse: no blocks written
    assert (tmp_path / "big.data").stat().st_blocks * 512 < 1 << 20
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    before = snapshot(tmp_path)

    refused = cli.run(["analyze", str(path), "--max-model-bytes", str(1 << 30)], scratch)
    assert refused.returncode == 2 and "exceeds the limit" in refused.stderr and refused.stderr.count("\n") == 1

    run = cli.run(["analyze", str(path), "--json", str(scratch / "a.json")], scratch, timeout=600)
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""
    import json

    data = json.loads((scratch / "a.json").read_text())
    assert data["total_params"] == 4 * columns
    assert data["total_macs"] == 4 * columns
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("scratch")} == {k: v for k, v in before.items() if not k.startswith("scratch")}


def test_exhausted_time_budget_is_reported(tmp_path: Path, cli: CliServer) -> None:
    """``--time-budget``: candidates left when it runs out are not tried, and the run says so in one line."""
    from tests.hostile import base_model

    path = tmp_path / "m.onnx"
    path.write_bytes(base_model().SerializeToString())
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    run = cli.run(["optimize", str(path), "-o", str(tmp_path / "out.onnx"), "--no-latency", "--time-budget", "0"], scratch)
    assert run.returncode == 0, run.stderr
    assert run.stderr.strip().splitlines() == ["onnx-bottleneck: validation time budget of 0s exhausted: 1 candidate(s) not tried"]
    negative = cli.run(["optimize", str(path), "-o", str(tmp_path / "out2.onnx"), "--time-budget", "-1"], scratch)
    assert negative.returncode == 2 and not (tmp_path / "out2.onnx").exists()
