"""int8 QDQ models (onnxruntime's quantize_static, QDQ format): their weights are counted, and the passes leave
the quantized structure alone, saying why at each place they looked."""

from __future__ import annotations

import onnx

from passes.bottleneck import Bottleneck
from passes.conv1x1_to_gemm import Conv1x1ToGemm
from rewriter.analysis import analyze, node_params
from rewriter.contract import Candidate, Skip
from rewriter.graph import QUANTIZED_WEIGHTS
from rewriter.model import Model
from rewriter.pipeline import optimize
from rewriter.validation.judge import ValidationConfig
from tests.helpers import parse

# A 3x3 conv and a 1x1 conv on a 1x1 map, each with per-channel int8 weights and an int32 bias behind
# DequantizeLinear, activations quantized to uint8 between them: the layout quantize_static writes.
QDQ = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1, 4, 1, 1] X) => (float[1, 8, 1, 1] Y)
    <int8[8, 4, 3, 3] Wq, float[8] Ws, int8[8] Wz, int32[8] Bq, float[8] Bs,
     float xs, uint8 xz, int8[8, 8, 1, 1] Vq, float[8] Vs, int8[8] Vz> {
        Xq = QuantizeLinear (X, xs, xz)
        Xd = DequantizeLinear (Xq, xs, xz)
        W = DequantizeLinear <axis = 0> (Wq, Ws, Wz)
        B = DequantizeLinear <axis = 0> (Bq, Bs)
        C = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (Xd, W, B)
        Cq = QuantizeLinear (C, xs, xz)
        Cd = DequantizeLinear (Cq, xs, xz)
        V = DequantizeLinear <axis = 0> (Vq, Vs, Vz)
        Y = Conv <kernel_shape = [1, 1]> (Cd, V)
    }
"""


def test_params_count_the_quantized_weights_not_scales_or_zero_points() -> None:
    model = Model.from_source(parse(QDQ))
    assert analyze(model).total_params == 8 * 4 * 3 * 3 + 8 + 8 * 8  # W, its bias, V
    by_op = {n.name: node_params(n) for n in model.graph.nodes}
    assert sum(v for name, v in by_op.items() if "Quantize" in name and "Dequantize" not in name) == 0


def test_passes_say_the_weights_are_quantized_and_change_nothing() -> None:
    source = parse(QDQ)
    model = Model.from_source(source)
    found = list(Bottleneck(include_pointwise=True).find(model)) + list(Conv1x1ToGemm().find(model))
    assert not [c for c in found if isinstance(c, Candidate)]
    reasons = {(s.pass_name, s.reason) for s in found if isinstance(s, Skip)}
    assert ("bottleneck", "quantized weights (QDQ): factorize the float model, then quantize it") in reasons
    assert any(p == "conv1x1_to_gemm" and r.endswith(QUANTIZED_WEIGHTS) for p, r in reasons), reasons
    result = optimize(model, ["conv1x1_to_gemm", "fold_batchnorm", "fuse_1x1_chain"], config=ValidationConfig(latency=False))
    assert not result.decisions and result.nothing_to_rewrite
    assert result.model.SerializeToString() == source.SerializeToString()  # the model as given, byte for byte
    onnx.checker.check_model(result.model)


def test_the_quantize_after_example_runs_end_to_end(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """examples/quantize_after.py: bottleneck on the float digits CNN, then quantize_static, then validate
    against the float original; it exits 0 only when the final model holds its stated budget."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "examples" / "quantize_after.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(root)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.startswith("bottleneck: ") and "factorization(s) kept" in line for line in lines)
    top1 = {line.split(":")[0][len("top-1 "):]: float(line.split(":")[1]) for line in lines if line.startswith("top-1 ")}
    assert set(top1) == {"float original", "bottleneck", "int8", "bottleneck + int8"}
    assert top1["bottleneck + int8"] >= top1["float original"] - 0.02
    assert lines[-1].endswith("PASS")
    quantized = onnx.load(str(tmp_path / "digits.bottleneck.int8.onnx"))
    assert any(n.op_type == "DequantizeLinear" for n in quantized.graph.node)
    again = Model.from_source(quantized)
    assert analyze(again).total_params == analyze(Model.from_source(str(tmp_path / "digits.bottleneck.onnx"))).total_params
