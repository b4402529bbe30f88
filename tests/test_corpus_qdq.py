"""A real int8 QDQ model of the corpus (onnxruntime's ``quantize_static``, QDQ format, per-channel weights):
``optimize`` exits 0 and changes no output, ``analyze`` counts the quantized weights (``make test-corpus``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from rewriter.cli import app
from rewriter.io import sha256_file
from tests.helpers import assert_same_outputs

pytestmark = pytest.mark.corpus
runner = CliRunner()

SHAPE = (1, 3, 320, 320)  # nudenet-320n (YOLOv8n): weights in initializers, which quantize_static quantizes


def _quantized(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Photos(CalibrationDataReader):
        def __init__(self) -> None:
            rng = np.random.default_rng(0)
            self.feeds = iter([{"images": rng.uniform(0, 1, SHAPE).astype(np.float32)} for _ in range(4)])

        def get_next(self):  # type: ignore[no-untyped-def]
            return next(self.feeds, None)

    fixed = onnx.load(src)  # quantize_static needs static shapes to pick its ranges: pin them as the CLI would
    for dim, value in zip(fixed.graph.input[0].type.tensor_type.shape.dim, SHAPE):
        dim.Clear()
        dim.dim_value = value
    pinned = dst.with_name("pinned.onnx")
    onnx.save(fixed, pinned)
    quantize_static(str(pinned), str(dst), Photos(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def test_a_quantized_corpus_model_optimizes_unchanged_and_its_weights_are_counted(corpus: Path, tmp_path: Path) -> None:
    qdq = tmp_path / "nudenet-320n.qdq.onnx"
    _quantized(corpus / "nudenet-320n.onnx", qdq)
    model = onnx.load(qdq)
    assert sum(n.op_type == "DequantizeLinear" for n in model.graph.node) > 50
    int8_weights = sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8)

    analysis = tmp_path / "a.json"
    res = runner.invoke(app, ["analyze", str(qdq), "--json", str(analysis)])
    assert res.exit_code == 0, res.output
    params = json.loads(analysis.read_text())["total_params"]
    assert params >= int8_weights > 2_000_000  # every int8 weight counted (with the int32 biases), not 32 scales

    sha = sha256_file(qdq)
    out, report = tmp_path / "opt.onnx", tmp_path / "r.json"
    res = runner.invoke(app, ["optimize", str(qdq), "-o", str(out), "--report", str(report)])
    assert res.exit_code == 0, res.output
    assert sha256_file(qdq) == sha
    data = json.loads(report.read_text())
    assert data["totals"]["kept"] == 0  # the exact passes leave the quantized structure as it is
    skips = [s["reason"] for p in data["passes"] for s in p["skips"]]
    assert any("quantized" in r for r in skips), skips
    feeds = [{"images": np.random.default_rng(i).uniform(0, 1, SHAPE).astype(np.float32)} for i in range(2)]
    assert_same_outputs(model, onnx.load(out), feeds=feeds)

    res = runner.invoke(app, ["optimize", str(qdq), "-o", str(tmp_path / "lossy.onnx"), "--passes", "bottleneck",
                              "--max-error", "cosine>=0.99", "--time-budget", "30"])
    assert res.exit_code == 0, res.output
