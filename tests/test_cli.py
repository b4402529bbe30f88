"""The command line: outputs, exit codes (0 ok, 1 gate failed, 2 bad input) and one-line errors.

Most runs go through typer's CliRunner (in process; it keeps stdout and stderr apart). One test runs the
installed console script to check the real entry point.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from typer.testing import CliRunner

import rewriter.pipeline
from rewriter.cli import app
from rewriter.io import save_model, sha256_file
from tests.helpers import assert_same_outputs

runner = CliRunner()


def invoke(*args: str | Path):  # type: ignore[no-untyped-def]
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result, exit_code: int = 2) -> str:  # type: ignore[no-untyped-def]
    """Exit code as given, and stderr is exactly one line starting with 'error:' -- no traceback."""
    assert result.exit_code == exit_code, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return lines[0]


def conv_names(model: onnx.ModelProto, *, dense_kxk: bool) -> set[str]:
    """Names of the sample's convs that are (or are not) dense with a kernel of at least 3."""
    weights = {t.name: tuple(t.dims) for t in model.graph.initializer}
    names = set()
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        is_kxk = group == 1 and max(weights[node.input[1]][2:]) >= 3
        if is_kxk == dense_kxk:
            names.add(node.name)
    return names


# -- passes / analyze ----------------------------------------------------------------------------------
def test_passes_lists_fuse_1x1_chain_as_exact() -> None:
    result = invoke("passes")
    assert result.exit_code == 0, result.output
    row = next(line for line in result.stdout.splitlines() if "fuse_1x1_chain" in line)
    assert "exact" in row
    assert "yes" in row  # exact passes run by default


def test_analyze_lists_the_dense_kxk_convs(sample_path: Path, sample_model: onnx.ModelProto) -> None:
    sha = sha256_file(sample_path)
    result = invoke("analyze", sample_path)
    assert result.exit_code == 0, result.output
    kxk = conv_names(sample_model, dense_kxk=True)
    assert len(kxk) == 4  # stem 3x3, inception 3x3 and 5x5, bottleneck 3x3
    for name in kxk:
        assert name in result.stdout
    for name in conv_names(sample_model, dense_kxk=False):  # the 1x1 convs are not ranked
        assert name not in result.stdout
    assert "5x5" in result.stdout and "3x3" in result.stdout
    assert result.stderr == ""
    assert sha256_file(sample_path) == sha


def test_analyze_json(sample_path: Path, sample_model: onnx.ModelProto, tmp_path: Path) -> None:
    sha = sha256_file(sample_path)
    out = tmp_path / "analysis.json"
    result = invoke("analyze", sample_path, "--json", out)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert isinstance(data["total_macs"], int) and data["total_macs"] > 0
    assert data["input_shapes"] == {"input": [1, 3, 112, 112]}
    ranked = [c["name"] for c in data["expensive_convs"]]
    assert set(ranked) == conv_names(sample_model, dense_kxk=True)
    macs = [c["macs"] for c in data["expensive_convs"]]
    assert macs == sorted(macs, reverse=True)
    assert sum(n["macs"] for n in data["nodes"]) == data["total_macs"]
    assert sha256_file(sample_path) == sha

    # The batch override goes through: batch 2 doubles every MAC count.
    out2 = tmp_path / "analysis2.json"
    assert invoke("analyze", sample_path, "--input-shape", "input:2x3x112x112", "--json", out2).exit_code == 0
    assert json.loads(out2.read_text())["total_macs"] == 2 * data["total_macs"]


# -- optimize ------------------------------------------------------------------------------------------
def check_optimized(output: Path, sample_model: onnx.ModelProto) -> None:
    onnx.checker.check_model(str(output), full_check=True)
    optimized = onnx.load(str(output))
    ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])  # loads and builds in onnxruntime
    assert_same_outputs(sample_model, optimized)


def test_optimize_writes_a_valid_faster_model_and_a_report(sample_path: Path, sample_model: onnx.ModelProto, tmp_path: Path) -> None:
    sha = sha256_file(sample_path)
    output, report = tmp_path / "opt.onnx", tmp_path / "report.json"
    # --fail-if-no-speedup: exit 0 only when the end-to-end speedup's 95% CI lies above 1.
    result = invoke("optimize", sample_path, "-o", output, "--report", report, "--fail-if-no-speedup")
    assert result.exit_code == 0, result.output
    assert f"wrote {output}" in result.stdout
    assert "end-to-end speedup" in result.stdout
    check_optimized(output, sample_model)

    data = json.loads(report.read_text())
    kept = [d for d in data["decisions"] if d["kept"]]
    assert any(d["pass"] == "fuse_1x1_chain" for d in kept)
    assert data["gate"] == {"passed": True, "failures": []}
    assert data["input"]["sha256"] == sha
    assert data["output"] == {"path": str(output), "sha256": sha256_file(output)}
    assert data["totals"]["macs_after"] < data["totals"]["macs_before"]
    final = data["totals"]["final_latency"]  # latency gating is on by default
    assert final is not None and final["scope"] == "model"
    assert final["ci_low"] > 1.0 and final["speedup"] > 1.0  # faster end to end, the whole CI above 1
    assert final["candidate_median_ms"] < final["base_median_ms"]
    assert sha256_file(sample_path) == sha


def test_optimize_no_latency(sample_path: Path, sample_model: onnx.ModelProto, tmp_path: Path) -> None:
    sha = sha256_file(sample_path)
    output, report = tmp_path / "opt.onnx", tmp_path / "report.json"
    result = invoke("optimize", sample_path, "-o", output, "--report", report, "--no-latency", "--passes", "fuse_1x1_chain")
    assert result.exit_code == 0, result.output
    check_optimized(output, sample_model)
    data = json.loads(report.read_text())
    assert data["totals"]["final_latency"] is None
    assert all(d.get("latency") is None for d in data["decisions"])
    assert [d["pass"] for d in data["decisions"] if d["kept"]] == ["fuse_1x1_chain"]
    assert sha256_file(sample_path) == sha


def test_optimize_with_external_data_output(sample_path: Path, sample_model: onnx.ModelProto, tmp_path: Path) -> None:
    output = tmp_path / "out" / "opt.onnx"
    output.parent.mkdir()
    result = invoke("optimize", sample_path, "-o", output, "--no-latency", "--external-data")
    assert result.exit_code == 0, result.output
    assert (output.parent / "opt.onnx.data").is_file()
    check_optimized(output, sample_model)


def test_optimize_failed_final_gate_writes_no_output(
    sample_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last check before writing: if the end-to-end numerics are out of budget, exit 1 and write nothing.

    The per-rewrite gate already compares against the original model, so a real pass cannot get past it
    with bad numerics; the final gate is forced to fail by corrupting the pipeline's final statistics.
    """
    real_optimize = rewriter.pipeline.optimize

    def corrupted(*args, **kwargs):  # type: ignore[no-untyped-def]
        result = real_optimize(*args, **kwargs)
        assert result.final_numerics, "the sample must have a kept rewrite for this test to mean anything"
        bad = {k: dataclasses.replace(v, max_abs=0.5, allclose_ratio=1e4) for k, v in result.final_numerics.items()}
        return dataclasses.replace(result, final_numerics=bad)

    monkeypatch.setattr(rewriter.pipeline, "optimize", corrupted)
    sha = sha256_file(sample_path)
    output, report = tmp_path / "opt.onnx", tmp_path / "report.json"
    result = invoke("optimize", sample_path, "-o", output, "--report", report, "--no-latency")
    line = assert_one_line_error(result, exit_code=1)
    assert "gate failed, no output written" in line
    assert not output.exists()
    assert sorted(os.listdir(tmp_path)) == sorted(["sample.onnx", "report.json"])  # no temp files either
    data = json.loads(report.read_text())
    assert data["gate"]["passed"] is False and data["gate"]["failures"]
    assert data["output"] == {"path": None, "sha256": None}
    assert sha256_file(sample_path) == sha


# -- exit code 2: bad input ----------------------------------------------------------------------------
def _outside_external_data(tmp_path: Path, sample_model: onnx.ModelProto) -> tuple[Path, Path]:
    """The sample saved with external data, whose data file then moves out of the model's folder."""
    model_dir, other = tmp_path / "model", tmp_path / "other"
    model_dir.mkdir()
    other.mkdir()
    path = save_model(sample_model, model_dir / "m.onnx", external_data=True)
    os.replace(model_dir / "m.onnx.data", other / "m.onnx.data")
    proto = onnx.load(str(path), load_external_data=False)
    count = 0
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../other/m.onnx.data"
                count += 1
    assert count > 0
    path.write_bytes(proto.SerializeToString())
    return path, other / "m.onnx.data"


@pytest.mark.parametrize("command", ["analyze", "optimize", "validate"])
@pytest.mark.parametrize("case", ["missing", "directory", "garbage", "external-outside"])
def test_unusable_inputs_exit_2_with_one_line(
    command: str, case: str, tmp_path: Path, sample_model: onnx.ModelProto
) -> None:
    watched: list[Path] = []
    if case == "missing":
        bad = tmp_path / "missing.onnx"
    elif case == "directory":
        bad = tmp_path / "dir.onnx"
        bad.mkdir()
        (bad / "inside.txt").write_text("keep me")
        watched.append(bad / "inside.txt")
    elif case == "garbage":
        bad = tmp_path / "garbage.onnx"
        bad.write_bytes(b"\x08\x07garbage, not protobuf\xff\xfe" * 10)
        watched.append(bad)
    else:
        bad, data = _outside_external_data(tmp_path, sample_model)
        watched += [bad, data]
    shas = [sha256_file(p) for p in watched]
    before = sorted(os.listdir(tmp_path))

    output = tmp_path / "out.onnx"
    args = {"analyze": ["analyze", bad], "optimize": ["optimize", bad, "-o", output], "validate": ["validate", bad, bad]}[command]
    line = assert_one_line_error(invoke(*args))
    expected = {"missing": "no such file", "directory": "is a directory", "garbage": "not an ONNX model",
                "external-outside": "leaves the model's folder"}[case]
    assert expected in line
    assert [sha256_file(p) for p in watched] == shas
    assert sorted(os.listdir(tmp_path)) == before  # nothing written, no output model
    assert not output.exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--passes", "no_such_pass"], "unknown pass 'no_such_pass'"),
        (["--passes", "fuse_1x1_chain,nope"], "unknown pass 'nope'"),
        (["--input-shape", "input"], "expected NAME:DIMS"),
        (["--input-shape", "input:1x3xhundred"], "dims must be integers"),
        (["--input-shape", "input:1x3x112"], "rank 3 given"),
        (["--input-shape", "input:1x4x112x112"], "the model fixes it to 3"),
        (["--input-shape", "image:1x3x112x112"], "'image', which is not an input"),
        (["--max-error", "cosine<=0.9"], "cosine is bounded with >="),
        (["--target-speedup", "1.5"], "--target-speedup needs latency measurement"),
        (["--target-speedup", "0.9"], "--target-speedup must be above 1"),
    ],
)
def test_bad_options_exit_2_with_one_line(args: list[str], expected: str, sample_path: Path, tmp_path: Path) -> None:
    sha = sha256_file(sample_path)
    output = tmp_path / "out.onnx"
    line = assert_one_line_error(invoke("optimize", sample_path, "-o", output, "--no-latency", *args))
    assert expected in line
    assert not output.exists()
    assert sha256_file(sample_path) == sha


def test_output_equal_to_input_needs_in_place(sample_path: Path) -> None:
    sha = sha256_file(sample_path)
    line = assert_one_line_error(invoke("optimize", sample_path, "-o", sample_path, "--no-latency"))
    assert "--in-place" in line
    assert sha256_file(sample_path) == sha
    # The same file reached through another spelling of its path is caught too.
    other = sample_path.parent / "." / sample_path.name
    assert "--in-place" in assert_one_line_error(invoke("optimize", sample_path, "-o", other, "--no-latency"))
    assert sha256_file(sample_path) == sha


def test_bad_input_shape_for_analyze(sample_path: Path) -> None:
    sha = sha256_file(sample_path)
    line = assert_one_line_error(invoke("analyze", sample_path, "--input-shape", "input:1x3x112"))
    assert "rank 3 given" in line
    assert sha256_file(sample_path) == sha


# -- validate: exit 0 and exit 1 -----------------------------------------------------------------------
def test_validate_model_against_itself_passes(sample_path: Path, tmp_path: Path) -> None:
    sha = sha256_file(sample_path)
    out = tmp_path / "validate.json"
    result = invoke("validate", sample_path, sample_path, "--no-latency", "--json", out)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == "PASS"
    assert result.stderr == ""
    data = json.loads(out.read_text())
    assert data["passed"] is True and data["failures"] == [] and data["latency"] is None
    assert all(s["max_abs"] == 0.0 for s in data["numerics"].values())
    assert sha256_file(sample_path) == sha


def test_validate_with_latency_reports_a_speedup(sample_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "validate.json"
    result = invoke("validate", sample_path, sample_path, "--json", out, "--num-feeds", "2")
    # Exit 0 or 1 (an identical model may by chance time as slower); either way the A/B was measured.
    assert result.exit_code in (0, 1), result.output
    data = json.loads(out.read_text())
    assert data["failures"] == []
    assert data["latency"] is not None
    assert "latency: base" in result.stdout


def test_validate_perturbed_weight_fails_with_exit_1(sample_path: Path, sample_model: onnx.ModelProto, tmp_path: Path) -> None:
    perturbed = onnx.ModelProto()
    perturbed.CopyFrom(sample_model)
    first_conv = next(n for n in perturbed.graph.node if n.op_type == "Conv")
    weight = next(t for t in perturbed.graph.initializer if t.name == first_conv.input[1])
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * np.float32(1.05), weight.name))
    candidate = tmp_path / "perturbed.onnx"
    onnx.save_model(perturbed, str(candidate))
    shas = (sha256_file(sample_path), sha256_file(candidate))

    result = invoke("validate", sample_path, candidate, "--no-latency")
    assert result.exit_code == 1, result.output
    output_name = sample_model.graph.output[0].name
    fails = [line for line in result.stderr.splitlines() if line.startswith("fail:")]
    assert fails and all(output_name in line for line in fails)
    assert "Traceback" not in result.output
    assert result.stdout.strip().splitlines()[-1] == "FAIL"
    assert (sha256_file(sample_path), sha256_file(candidate)) == shas


# -- the installed entry point -------------------------------------------------------------------------
def test_console_script_exit_code_and_stderr(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "onnx-bottleneck"
    if not script.exists():
        pytest.skip("onnx-bottleneck console script is not installed next to this Python")
    missing = tmp_path / "missing.onnx"
    proc = subprocess.run([str(script), "analyze", str(missing)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [f"error: {missing}: no such file"]


# -- the app's own flags after the command -------------------------------------------------------------------
def test_global_flags_move_before_the_command_and_nothing_after_a_double_dash() -> None:
    from rewriter.cli import hoist_global_flags

    assert hoist_global_flags(["optimize", "m.onnx", "-o", "o.onnx", "-q"]) == ["-q", "optimize", "m.onnx", "-o", "o.onnx"]
    assert hoist_global_flags(["--debug", "analyze", "m.onnx", "-v"]) == ["--debug", "-v", "analyze", "m.onnx"]
    assert hoist_global_flags(["analyze", "--", "-q"]) == ["analyze", "--", "-q"]


def test_quiet_after_the_command_works_from_the_console_script(sample_path: Path, tmp_path: Path) -> None:
    output = tmp_path / "o.onnx"
    proc = subprocess.run(
        [sys.executable, "-m", "rewriter.cli", "optimize", str(sample_path), "-o", str(output), "--no-latency", "-q"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines() == [f"wrote {output}: 1 rewrite(s) kept, 0 rolled back"]
    assert proc.stderr == ""
