"""Corpus CNNs converted to float16 by onnxruntime's own converter (``convert_float_to_float16(model,
keep_io_types=True)``) optimize with exit 0, exact and lossy; the rewritten weights stay float16."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import onnx
import pytest
from typer.testing import CliRunner

from passes.bottleneck.options import MARK
from rewriter.cli import app
from scripts.fetch_corpus import CORPUS

pytestmark = [pytest.mark.corpus, pytest.mark.slow]
runner = CliRunner()
SHAPES = {m.short: m.input_shapes for m in CORPUS}

LOSSY = ["--passes", "bottleneck", "--max-error", "cosine>=0.99"]
#: (model, extra CLI arguments, pass whose rewrites must be kept (None: any outcome)). Whether a bottleneck
#: is kept within the time budget depends on the machine's load (screening comes first), so it is not required.
RUNS = [
    ("ppocr-cls", [], "fold_batchnorm"),  # 35 BatchNormalizations; exact
    ("ppocr-cls", LOSSY, None),  # depthwise convs only: nothing to factorize
    ("nudenet-320n", [], None),  # BN already folded by the exporter
    ("nudenet-320n", LOSSY, None),
]


def float_types(model: onnx.ModelProto) -> Counter[int]:
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    return Counter(t.data_type for t in model.graph.initializer if t.data_type in floats)


@pytest.mark.parametrize("short,args,kept", RUNS, ids=lambda v: v if isinstance(v, str) else None)
def test_float16_model_optimizes(short: str, args: list[str], kept: str | None, corpus: Path, tmp_path: Path) -> None:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    half = convert_float_to_float16(onnx.load(corpus / f"{short}.onnx"), keep_io_types=True)
    src, out, report = tmp_path / "fp16.onnx", tmp_path / "opt.onnx", tmp_path / "r.json"
    onnx.save(half, src)
    shapes = [a for s in SHAPES[short] for a in ("--input-shape", s)]
    res = runner.invoke(app, ["optimize", str(src), "-o", str(out), "--report", str(report), "--time-budget", "60", *shapes, *args])
    assert res.exit_code == 0, res.output
    optimized = onnx.load(out)
    onnx.checker.check_model(optimized)
    io = lambda m: [v.type.tensor_type.elem_type for v in [*m.graph.input, *m.graph.output]]  # noqa: E731
    assert io(optimized) == io(half)  # float32 in and out, as the converter left them
    before, after = float_types(half), float_types(optimized)
    assert after[onnx.TensorProto.FLOAT] <= before[onnx.TensorProto.FLOAT]  # no weight came back as float32
    data = json.loads(report.read_text())
    if "--max-error" not in args:
        assert "float16 weights" in data["budget"]
    if kept is not None:
        assert any(d["pass"] == kept and d["outcome"] == "kept" for d in data["decisions"]), data["budget"]
    factors = [t for t in optimized.graph.initializer if MARK in t.name]
    assert all(t.data_type == onnx.TensorProto.FLOAT16 for t in factors)
    assert bool(factors) == any(d["pass"] == "bottleneck" and d["outcome"] == "kept" for d in data["decisions"])
