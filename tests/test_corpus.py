"""End-to-end on the real models of the corpus (``make test-corpus``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from rewriter.cli import app
from rewriter.io import sha256_file
from rewriter.shapes import parse_input_shapes
from scripts.fetch_corpus import CORPUS, CorpusModel
from tests.helpers import assert_same_outputs, feeds_for

pytestmark = pytest.mark.corpus
runner = CliRunner()


def _shape_args(m: CorpusModel) -> list[str]:
    return [a for s in m.input_shapes for a in ("--input-shape", s)]


@pytest.mark.parametrize("m", CORPUS, ids=lambda m: m.short)
def test_analyze_and_optimize(m: CorpusModel, corpus: Path, tmp_path: Path) -> None:
    src = corpus / f"{m.short}.onnx"
    sha = sha256_file(src)
    report = tmp_path / "analysis.json"
    res = runner.invoke(app, ["analyze", str(src), "--json", str(report), *_shape_args(m)])
    assert res.exit_code == 0, res.output
    out = tmp_path / "opt.onnx"
    res = runner.invoke(app, ["optimize", str(src), "-o", str(out), "--report", str(tmp_path / "r.json"), *_shape_args(m)])
    assert res.exit_code == 0, res.output
    assert sha256_file(src) == sha
    optimized = onnx.load(out)
    onnx.checker.check_model(optimized, full_check=True)
    shapes = parse_input_shapes(m.input_shapes)
    original = onnx.load(src)
    assert_same_outputs(original, optimized, feeds=feeds_for(original, count=2, input_shapes=shapes))


def test_open_nsfw_lists_its_expensive_convs(corpus: Path, tmp_path: Path) -> None:
    import json

    report = tmp_path / "a.json"
    res = runner.invoke(app, ["analyze", str(corpus / "open-nsfw.onnx"), "--json", str(report)])
    assert res.exit_code == 0, res.output
    convs = json.loads(report.read_text())["expensive_convs"]
    kernels = sorted(tuple(c["kernel"]) for c in convs)
    assert kernels.count((3, 3)) == 16 and kernels.count((7, 7)) == 1 and len(kernels) == 17
    assert convs[0]["kernel"] == [7, 7]  # the stem is the single most expensive conv


def test_validate_open_nsfw_against_itself_and_a_perturbed_copy(corpus: Path, tmp_path: Path) -> None:
    src = corpus / "open-nsfw.onnx"
    res = runner.invoke(app, ["validate", str(src), str(src)])
    assert res.exit_code == 0, res.output
    model = onnx.load(src)
    conv = next(n for n in model.graph.node if n.op_type == "Conv" and n.name == "Conv__450")  # a 3x3 conv
    init = next(t for t in model.graph.initializer if t.name == conv.input[1])
    scaled = onnx.numpy_helper.to_array(init) * np.float32(1.05)
    init.CopyFrom(onnx.numpy_helper.from_array(scaled.astype(np.float32), init.name))
    bad = tmp_path / "scaled.onnx"
    onnx.save(model, bad)
    res = runner.invoke(app, ["validate", str(src), str(bad), "--no-latency"])
    assert res.exit_code == 1, res.output
    assert "outputs" in res.output  # the failing output is named
