"""Model zoos as they come, through the command line: a model with nothing to rewrite passes through with no
feeds and no input shapes (exit 0, the bytes of the input); one whose quirks onnxruntime accepts is
normalized on load, optimized, and says so."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from rewriter.io import sha256_file
from rewriter.pipeline import optimize
from tests.helpers import assert_valid, parse
from tests.html_checks import page_problems
from tests.test_cli import assert_one_line_error, invoke
from tests.test_io_normalize import RAISED, SORTED, fp16_model, ir3_cnn, ort_run, write

#: No Conv, a string input, nodes without names (as many exporters leave them).
STRINGS = """
<ir_version: 8, opset_import: ["" : 17]>
words (string[2] x, float[1, 4] f) => (string[2] y, float[1, 4] g) {
    y = Identity (x)
    g = Relu (f)
}
"""
#: A dynamic dim no default resolves, and no --input-shape.
DYNAMIC = """
<ir_version: 8, opset_import: ["" : 17]>
dyn (float[1, n] X) => (float[1, n] Y) {
    Y = Relu (X)
}
"""
SEQUENCE = """
<ir_version: 8, opset_import: ["" : 17]>
seqs (seq(float[3]) s) => (int64 n) {
    n = SequenceLength (s)
}
"""
#: A string input beside a 1x1 pair that fuse_1x1_chain fuses: judging it needs feeds.
STRINGS_AND_A_PAIR = """
<ir_version: 8, opset_import: ["" : 17]>
mixed (string[2] x, float[1, 3, 4, 4] f) => (string[2] y, float[1, 4, 4, 4] g) <float[8, 3, 1, 1] W1, float[4, 8, 1, 1] W2> {
    y = Identity (x)
    a = Conv (f, W1)
    g = Conv (a, W2)
}
"""


@pytest.mark.parametrize("text", [STRINGS, DYNAMIC, SEQUENCE], ids=["string-input", "dynamic-dim", "sequence-input"])
def test_nothing_to_rewrite_passes_through_without_feeds(text: str, tmp_path: Path, report_validator) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    src = write(onnx.parser.parse_model(text), tmp_path / "m.onnx")
    sha = sha256_file(src)
    out, report, html = tmp_path / "out.onnx", tmp_path / "r.json", tmp_path / "r.html"
    result = invoke("optimize", src, "-o", out, "--report", report, "--html", html)  # latency on: nothing is timed either
    assert result.exit_code == 0, result.output
    assert f"nothing to rewrite: wrote {out} unchanged (bytes identical to the input file)" in result.stdout
    assert out.read_bytes() == src.read_bytes() and sha256_file(src) == sha  # the same graph, node names as given
    data = json.loads(report.read_text())
    assert_valid(report_validator, data)
    assert data["decisions"] == [] and data["feeds"] == "none (nothing to rewrite)" and data["normalized"] == []
    assert data["output"]["sha256"] == data["input"]["sha256"] == sha
    assert data["gate"] == {"passed": True, "failures": []}
    assert "No candidate was found" in html.read_text()  # and nothing profiled
    assert page_problems(html.read_text()) == []  # nothing measured is left out or said, never printed as None


def test_a_candidate_still_needs_feeds(tmp_path: Path) -> None:
    src = write(parse(STRINGS_AND_A_PAIR), tmp_path / "m.onnx")
    line = assert_one_line_error(invoke("optimize", src, "-o", tmp_path / "out.onnx", "--no-latency"))
    assert "input 'x' has dtype object, for which no random feed can be made; pass --feeds" in line
    assert not (tmp_path / "out.onnx").exists()


def test_a_candidate_still_needs_input_shapes(tmp_path: Path) -> None:
    src = write(parse(STRINGS_AND_A_PAIR.replace("string[2] x", "float[1, m] x").replace("string[2] y", "float[1, m] y")),
                tmp_path / "m.onnx")
    line = assert_one_line_error(invoke("optimize", src, "-o", tmp_path / "out.onnx", "--no-latency"))
    assert "input 'x' has dynamic dims [1, 'm']; pass --input-shape x:" in line
    result = invoke("optimize", src, "-o", tmp_path / "out.onnx", "--no-latency", "--input-shape", "x:1x5")
    assert result.exit_code == 0 and "1 rewrite(s) kept" in result.stdout, result.output


def test_an_input_shape_for_no_input_is_still_a_mistake(tmp_path: Path) -> None:
    src = write(onnx.parser.parse_model(DYNAMIC), tmp_path / "m.onnx")
    line = assert_one_line_error(invoke("optimize", src, "-o", tmp_path / "out.onnx", "--input-shape", "q:1x2"))
    assert "names 'q', which is not an input" in line


def test_fail_if_no_speedup_still_fails_with_nothing_to_rewrite(tmp_path: Path) -> None:
    src = write(onnx.parser.parse_model(STRINGS), tmp_path / "m.onnx")
    line = assert_one_line_error(invoke("optimize", src, "-o", tmp_path / "out.onnx", "--fail-if-no-speedup"), exit_code=1)
    assert "no end-to-end speedup: no rewrite was kept" in line


def test_optimize_many_counts_nothing_to_rewrite_as_ok(tmp_path: Path) -> None:
    models = [write(onnx.parser.parse_model(t), tmp_path / f"{n}.onnx") for n, t in (("words", STRINGS), ("dyn", DYNAMIC))]
    result = invoke("optimize-many", *models, "--out-dir", tmp_path / "out", "--jobs", "1", "--no-latency")
    assert result.exit_code == 0, result.output
    assert "2 of 2 model(s) ok" in result.stdout
    for m in models:
        assert (tmp_path / "out" / m.name).read_bytes() == m.read_bytes()


def test_the_plan_of_nothing_to_rewrite_replays_to_the_same_bytes(tmp_path: Path) -> None:
    src = write(onnx.parser.parse_model(DYNAMIC), tmp_path / "m.onnx")
    out, replayed, plan = tmp_path / "out.onnx", tmp_path / "replayed.onnx", tmp_path / "plan.json"
    assert invoke("optimize", src, "-o", out, "--no-latency", "--save-plan", plan).exit_code == 0
    result = invoke("apply", src, "--plan", plan, "-o", replayed)
    assert result.exit_code == 0, result.output
    assert replayed.read_bytes() == out.read_bytes() == src.read_bytes()


def test_the_python_api_returns_the_model_as_given() -> None:
    model = onnx.parser.parse_model(STRINGS)
    result = optimize(model)
    assert result.nothing_to_rewrite and not result.changed and result.feeds == "none (nothing to rewrite)"
    assert result.model.SerializeToString() == model.SerializeToString()


# -- normalized on load ------------------------------------------------------------------------------------
def test_ir3_cnn_is_analyzed_and_optimized_exactly(tmp_path: Path, report_validator) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    src = write(ir3_cnn(), tmp_path / "cnn.onnx")
    sha = sha256_file(src)
    analyzed = invoke("analyze", src)
    assert analyzed.exit_code == 0, analyzed.output
    assert f"(normalized on load: {RAISED})" in analyzed.stdout
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    result = invoke("optimize", src, "-o", out, "--report", report, "--no-latency")
    assert result.exit_code == 0, result.output
    assert f"(normalized on load: {RAISED})" in result.stdout
    data = json.loads(report.read_text())
    assert_valid(report_validator, data)
    assert data["normalized"] == [RAISED] and data["totals"]["kept"] >= 1
    assert sha256_file(src) == sha
    optimized = onnx.load(str(out))
    assert optimized.ir_version == 4
    onnx.checker.check_model(optimized, full_check=True)
    feed = {"data": np.random.default_rng(5).standard_normal((1, 3, 8, 8)).astype(np.float32)}
    for got, want in zip(ort_run(out, feed), ort_run(src, feed)):  # against the original file, as onnxruntime runs it
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_unsorted_fp16_export_is_optimized(tmp_path: Path) -> None:
    src = write(fp16_model(), tmp_path / "fp16.onnx")
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    result = invoke("optimize", src, "-o", out, "--report", report, "--no-latency")
    assert result.exit_code == 0, result.output
    assert json.loads(report.read_text())["normalized"] == [SORTED]
    onnx.checker.check_model(str(out), full_check=True)
    feed = {"x": np.random.default_rng(6).standard_normal((1, 3, 4, 4)).astype(np.float32)}
    np.testing.assert_allclose(ort_run(out, feed)[0], ort_run(src, feed)[0], rtol=1e-2, atol=1e-2)  # fp16 weights
