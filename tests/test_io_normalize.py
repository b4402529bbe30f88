"""Harmless export quirks normalized on load (rewriter.io.normalize): models built the way their exporters
build them load, say what was normalized, and mean what onnxruntime runs; anything else stays refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from rewriter.errors import InputError
from rewriter.io import normalize_model, read_model, sha256_file
from rewriter.io.normalize import topological_order
from rewriter.model import Model
from tests.helpers import assert_same_outputs, parse, run_reference

RAISED = "ir_version 3 -> 4: initializers were not listed as graph inputs (constants either way)"
SORTED = "nodes sorted into topological order (main graph)"


def ir3_cnn(*, listed: tuple[str, ...] = (), seed: int = 0) -> onnx.ModelProto:
    """A small CNN as an older converter wrote it: IR 3, opset 8, weights as initializers only (``listed``:
    the initializers that are graph inputs too). Conv 3x3 -> BatchNormalization -> Relu -> Conv 1x1 ->
    Conv 1x1 -> GlobalAveragePool -> Flatten -> Gemm -> Softmax."""
    rng = np.random.default_rng(seed)
    weights = {
        "convolution_W": rng.standard_normal((8, 3, 3, 3)), "convolution_B": rng.standard_normal(8),
        "bn_scale": 1 + 0.1 * rng.standard_normal(8), "bn_B": 0.1 * rng.standard_normal(8),
        "bn_mean": 0.1 * rng.standard_normal(8), "bn_var": 0.5 + rng.random(8),
        "convolution1_W": rng.standard_normal((16, 8, 1, 1)), "convolution1_B": rng.standard_normal(16),
        "convolution2_W": rng.standard_normal((8, 16, 1, 1)), "convolution2_B": rng.standard_normal(8),
        "fc_W": rng.standard_normal((5, 8)), "fc_B": rng.standard_normal(5),
    }
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()]
    nodes = [
        helper.make_node("Conv", ["data", "convolution_W", "convolution_B"], ["convolution"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["convolution", "bn_scale", "bn_B", "bn_mean", "bn_var"], ["bn"], epsilon=1e-5),
        helper.make_node("Relu", ["bn"], ["relu"]),
        helper.make_node("Conv", ["relu", "convolution1_W", "convolution1_B"], ["convolution1"], kernel_shape=[1, 1]),
        helper.make_node("Conv", ["convolution1", "convolution2_W", "convolution2_B"], ["convolution2"], kernel_shape=[1, 1]),
        helper.make_node("GlobalAveragePool", ["convolution2"], ["pool"]),
        helper.make_node("Flatten", ["pool"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "fc_W", "fc_B"], ["fc"], transB=1),
        helper.make_node("Softmax", ["fc"], ["prob"], axis=1),
    ]
    inputs = [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, 8, 8])]
    inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits if t.name in listed]
    graph = helper.make_graph(nodes, "cnn", inputs, [helper.make_tensor_value_info("prob", TensorProto.FLOAT, [1, 5])], inits)
    return helper.make_model(graph, ir_version=3, opset_imports=[helper.make_opsetid("", 8)], producer_name="OldConverter")


def fp16_model() -> onnx.ModelProto:
    """What ``convert_float_to_float16(model, keep_io_types=True)`` writes (built by hand, so the test does not
    depend on the converter's version): fp16 weights, the input's Cast appended after the nodes reading it."""
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float16), n) for n, s in
             (("W1", (8, 3, 1, 1)), ("B1", (8,)), ("W2", (4, 8, 1, 1)), ("B2", (4,)))]
    nodes = [
        helper.make_node("Conv", ["graph_input_cast_0", "W1", "B1"], ["a"], name="conv1"),
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "W2", "B2"], ["graph_output_cast_0"], name="conv2"),
        helper.make_node("Cast", ["x"], ["graph_input_cast_0"], name="graph_input_cast0", to=TensorProto.FLOAT16),
        helper.make_node("Cast", ["graph_output_cast_0"], ["y"], name="graph_output_cast0", to=TensorProto.FLOAT),
    ]
    graph = helper.make_graph(nodes, "fp16", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 4])], inits)
    return helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)])


def ort_run(model: onnx.ModelProto | Path, feed: dict) -> list[np.ndarray]:
    """Outputs under onnxruntime (of a file as it is, quirks and all)."""
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, feed)


def write(model: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


# -- IR 3: initializers not listed as graph inputs -------------------------------------------------------
def test_ir3_model_without_initializer_inputs_is_raised_to_ir4(tmp_path: Path) -> None:
    path = write(ir3_cnn(), tmp_path / "cnn.onnx")
    with pytest.raises(onnx.checker.ValidationError, match="in initializer but not in graph input"):
        onnx.checker.check_model(onnx.load(str(path)))  # the quirk, as the checker sees it
    sha = sha256_file(path)
    loaded = read_model(path)
    assert loaded.normalized == (RAISED,)
    assert loaded.proto.ir_version == 4
    assert [vi.name for vi in loaded.proto.graph.input] == ["data"]  # the interface is the file's
    onnx.checker.check_model(loaded.proto, full_check=True)
    assert sha256_file(path) == sha  # the file is never modified
    feed = {"data": np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)}
    for got, want in zip(ort_run(loaded.proto, feed), ort_run(path, feed)):  # the meaning onnxruntime gives the file
        np.testing.assert_array_equal(got, want)


def test_ir3_model_listing_some_initializers_lists_the_rest_and_stays_ir3(tmp_path: Path) -> None:
    loaded = read_model(write(ir3_cnn(listed=("convolution_W", "fc_W")), tmp_path / "cnn.onnx"))
    assert loaded.normalized == ("listed 10 initializer(s) as graph inputs, as IR 3 requires",)
    assert loaded.proto.ir_version == 3
    assert {vi.name for vi in loaded.proto.graph.input} == {"data"} | {t.name for t in loaded.proto.graph.initializer}
    # IR 3 initializers are constants: the model's own inputs are still just the data.
    assert Model.from_source(loaded.proto).input_shapes == {"data": (1, 3, 8, 8)}


def test_ir3_model_listing_every_initializer_is_left_alone() -> None:
    model = ir3_cnn(listed=tuple(t.name for t in ir3_cnn().graph.initializer))
    before = model.SerializeToString()
    assert normalize_model(model) == []
    assert model.SerializeToString() == before


def test_ir_versions_1_and_2_are_not_normalized(tmp_path: Path) -> None:
    model = ir3_cnn()
    model.ir_version = 2
    assert normalize_model(model) == [] and model.ir_version == 2
    with pytest.raises(InputError, match="invalid ONNX model"):
        read_model(write(model, tmp_path / "ir2.onnx"))


def test_ir3_model_is_optimized_exactly(tmp_path: Path) -> None:
    from rewriter.pipeline import optimize
    from rewriter.validation.judge import ValidationConfig

    path = write(ir3_cnn(), tmp_path / "cnn.onnx")
    result = optimize(path, config=ValidationConfig(latency=False))
    assert result.normalized == (RAISED,) and result.in_model  # e.g. the BN folded, the 1x1 pair fused
    assert result.model.ir_version == 4
    onnx.checker.check_model(result.model, full_check=True)
    feed = {"data": np.random.default_rng(3).standard_normal((1, 3, 8, 8)).astype(np.float32)}
    for got, want in zip(ort_run(result.model, feed), ort_run(path, feed)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


# -- opsets imported twice -------------------------------------------------------------------------------
def relu_model(*opsets: tuple[str, int]) -> onnx.ModelProto:
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])


def test_an_opset_imported_twice_at_one_version_is_imported_once(tmp_path: Path) -> None:
    path = write(relu_model(("", 17), ("ai.onnx", 17), ("", 17)), tmp_path / "m.onnx")
    feed = {"x": np.array([[-1.0, 2.0]], np.float32)}
    np.testing.assert_array_equal(ort_run(path, feed)[0], [[0.0, 2.0]])  # onnxruntime runs it
    loaded = read_model(path)
    assert loaded.normalized == ("dropped 2 repeated opset import(s) ('ai.onnx')",)
    assert [(o.domain, o.version) for o in loaded.proto.opset_import] == [("", 17)]


def test_an_opset_imported_at_two_versions_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="more than once"):
        read_model(write(relu_model(("", 17), ("", 16)), tmp_path / "m.onnx"))


# -- topological order -----------------------------------------------------------------------------------
def test_fp16_export_with_io_casts_appended_is_sorted(tmp_path: Path) -> None:
    model = fp16_model()
    with pytest.raises(onnx.checker.ValidationError, match="topologically sorted"):
        onnx.checker.check_model(model)
    path = write(model, tmp_path / "fp16.onnx")
    loaded = read_model(path)
    assert loaded.normalized == (SORTED,)
    assert [n.name for n in loaded.proto.graph.node] == ["graph_input_cast0", "conv1", "relu", "conv2", "graph_output_cast0"]
    onnx.checker.check_model(loaded.proto, full_check=True)
    feed = {"x": np.random.default_rng(0).standard_normal((1, 3, 4, 4)).astype(np.float32)}
    np.testing.assert_array_equal(ort_run(loaded.proto, feed)[0], ort_run(path, feed)[0])


def test_the_real_fp16_converter_output_loads(tmp_path: Path) -> None:
    float16 = pytest.importorskip("onnxruntime.transformers.float16")
    base = parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        net (float[1, 3, 4, 4] x) => (float[1, 4, 4, 4] y) <float[8, 3, 1, 1] W1, float[4, 8, 1, 1] W2> {
            a = Conv (x, W1)
            r = Relu (a)
            y = Conv (r, W2)
        }""", seed=2)
    converted = float16.convert_float_to_float16(base, keep_io_types=True)
    path = write(converted, tmp_path / "fp16.onnx")
    loaded = read_model(path)
    onnx.checker.check_model(loaded.proto, full_check=True)
    if topological_order(converted.graph.node) != list(range(len(converted.graph.node))):
        assert loaded.normalized == (SORTED,)  # this converter version appends its casts out of order
    feed = {"x": np.random.default_rng(2).standard_normal((1, 3, 4, 4)).astype(np.float32)}
    np.testing.assert_array_equal(ort_run(loaded.proto, feed)[0], ort_run(path, feed)[0])


def test_sorting_moves_only_what_must_move() -> None:
    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2] x) => (float[2] y, float[2] z) {
            a = Relu (x)
            c = Neg (b)
            b = Abs (a)
            z = Sigmoid (x)
            y = Add (c, a)
        }""")
    assert normalize_model(model) == [SORTED]
    assert [n.output[0] for n in model.graph.node] == ["a", "b", "c", "z", "y"]
    assert normalize_model(model) == []  # a sorted graph keeps its order exactly


def test_a_node_holding_a_subgraph_follows_what_the_subgraph_reads() -> None:
    then_branch = helper.make_graph([helper.make_node("Neg", ["late"], ["t"])], "then", [], [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2])])
    else_branch = helper.make_graph([helper.make_node("Abs", ["late"], ["e2"]), helper.make_node("Neg", ["e1"], ["e"]),
                                     helper.make_node("Relu", ["e2"], ["e1"])], "else", [], [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2])])
    nodes = [
        helper.make_node("If", ["cond"], ["y"], then_branch=then_branch, else_branch=else_branch),
        helper.make_node("Relu", ["x"], ["late"]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
                                           helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert normalize_model(model) == ["nodes sorted into topological order (main graph, 1 subgraph)"]
    assert [n.op_type for n in model.graph.node] == ["Relu", "If"]
    (else_sorted,) = [a.g for a in model.graph.node[1].attribute if a.name == "else_branch"]
    assert [n.output[0] for n in else_sorted.node] == ["e2", "e1", "e"]
    onnx.checker.check_model(model, full_check=True)
    feed = {"x": np.array([1.0, -2.0], np.float32), "cond": np.array(False)}
    np.testing.assert_array_equal(run_reference(model, [feed])[0][0], [-1.0, 0.0])


@pytest.mark.parametrize(
    ("nodes", "message"),
    [
        ([("Relu", ["c"], ["a"]), ("Relu", ["a"], ["b"]), ("Relu", ["b"], ["c"]), ("Relu", ["x"], ["y"])], "cycle"),
        ([("Relu", ["a"], ["y"]), ("Relu", ["x"], ["a"]), ("Abs", ["x"], ["a"])], "produced by more than one node"),
        ([("Relu", ["a"], ["y"]), ("Relu", ["ghost"], ["a"])], "'ghost', which nothing defines"),
    ],
)
def test_what_cannot_be_sorted_is_refused_as_before(tmp_path: Path, nodes: list, message: str) -> None:
    graph = helper.make_graph([helper.make_node(op, i, o) for op, i, o in nodes], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(InputError, match=message):
        read_model(write(model, tmp_path / "m.onnx"))


# -- the model keeps what the source gave -------------------------------------------------------------------
def test_model_records_what_was_normalized_and_keeps_the_given_names(tmp_path: Path) -> None:
    model = fp16_model()
    for node in model.graph.node[:3]:
        node.name = ""
    m = Model.from_source(write(model, tmp_path / "fp16.onnx"))
    assert m.normalized == (SORTED,)
    assert all(n.name for n in m.proto.graph.node)  # the tool's own names
    assert [n.name for n in m.as_given().graph.node] == ["graph_input_cast0", "", "", "", "graph_output_cast0"]
    assert_same_outputs(m.proto, m.as_given(), rtol=0, atol=0)
    assert Model.from_source(m.as_given()).normalized == ()
