"""fuse_1x1_chain: math alone, then the pass on tiny ONNX-text graphs, numerically against onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from passes.fuse_1x1_chain import Fuse1x1Chain, compose_pointwise
from rewriter.pipeline import apply_pass
from tests.helpers import assert_same_outputs, ops, parse


def test_compose_pointwise_matches_two_matmuls() -> None:
    rng = np.random.default_rng(0)
    w1, b1 = rng.standard_normal((6, 4)), rng.standard_normal(6)
    w2, b2 = rng.standard_normal((3, 6)), rng.standard_normal(3)
    x = rng.standard_normal(4)
    w, b = compose_pointwise(w1, b1, w2, b2)
    np.testing.assert_allclose(w @ x + b, w2 @ (w1 @ x + b1) + b2, rtol=1e-12)


@pytest.mark.parametrize("has_b1,has_b2", [(True, True), (True, False), (False, True), (False, False)])
def test_compose_pointwise_bias_variants(has_b1: bool, has_b2: bool) -> None:
    rng = np.random.default_rng(1)
    w1, w2 = rng.standard_normal((5, 2)), rng.standard_normal((4, 5))
    b1 = rng.standard_normal(5) if has_b1 else None
    b2 = rng.standard_normal(4) if has_b2 else None
    w, b = compose_pointwise(w1, b1, w2, b2)
    x = rng.standard_normal(2)
    want = w2 @ (w1 @ x + (b1 if b1 is not None else 0)) + (b2 if b2 is not None else 0)
    np.testing.assert_allclose(w @ x + (b if b is not None else 0), want, rtol=1e-12)
    assert (b is None) == (not has_b1 and not has_b2)


def chain_model(c: int, m: int, o: int, *, s1: int = 1, s2: int = 1, bias1: bool = True, bias2: bool = True,
                act: str | None = None, pads1: int = 0, group2: int = 1, opset: int = 17, hw: int = 9,
                middle_is_output: bool = False) -> onnx.ModelProto:
    rng = np.random.default_rng(c * 100 + m * 10 + o)
    inits = [numpy_helper.from_array(rng.standard_normal((m, c, 1, 1)).astype(np.float32), "W1"),
             numpy_helper.from_array(rng.standard_normal((o, m // group2, 1, 1)).astype(np.float32), "W2")]
    in1, in2 = ["X", "W1"], ["H", "W2"]
    if bias1:
        inits.append(numpy_helper.from_array(rng.standard_normal(m).astype(np.float32), "B1"))
        in1.append("B1")
    if bias2:
        inits.append(numpy_helper.from_array(rng.standard_normal(o).astype(np.float32), "B2"))
        in2.append("B2")
    nodes = [helper.make_node("Conv", in1, ["M"], name="c1", kernel_shape=[1, 1], strides=[s1, s1], pads=[pads1] * 4)]
    if act:
        nodes.append(helper.make_node(act, ["M"], ["H"], name="act"))
    else:
        nodes[0].output[0] = "H"
    nodes.append(helper.make_node("Conv", in2, ["Y"], name="c2", kernel_shape=[1, 1], strides=[s2, s2], group=group2))
    mid = (hw + 2 * pads1 - 1) // s1 + 1
    out = (mid - 1) // s2 + 1
    outputs = [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, [1, o, out, out])]
    if middle_is_output:
        outputs.append(helper.make_tensor_value_info("H", onnx.TensorProto.FLOAT, [1, m, mid, mid]))
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, [1, c, hw, hw])], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("opset", [11, 13, 17])
@pytest.mark.parametrize("bias1,bias2", [(True, True), (False, True), (True, False), (False, False)])
@pytest.mark.parametrize("s1,s2", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_fuses_expansion_then_projection(opset: int, bias1: bool, bias2: bool, s1: int, s2: int) -> None:
    model = chain_model(8, 32, 4, s1=s1, s2=s2, bias1=bias1, bias2=bias2, opset=opset)
    result = apply_pass(model, Fuse1x1Chain())
    assert result.modified and len(result.applied) == 1
    assert ops(result.model) == {"Conv": 1}
    onnx.checker.check_model(result.model, full_check=True)
    assert_same_outputs(model, result.model)
    conv = result.model.graph.node[0]
    strides = next(a.ints for a in conv.attribute if a.name == "strides")
    assert list(strides) == [s1 * s2, s1 * s2]
    assert result.model.graph.output[0].name == "Y"


def test_chain_of_three_reaches_fixed_point() -> None:
    model = parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 4, 5, 5] X) => (float[1, 2, 5, 5] Y)
        <float[16, 4, 1, 1] W1, float[16, 16, 1, 1] W2, float[2, 16, 1, 1] W3> {
            A = Conv <kernel_shape = [1, 1]> (X, W1)
            B = Conv <kernel_shape = [1, 1]> (A, W2)
            Y = Conv <kernel_shape = [1, 1]> (B, W3)
        }
    """)
    result = apply_pass(model, Fuse1x1Chain())
    assert ops(result.model) == {"Conv": 1}
    assert len(result.applied) == 2
    assert_same_outputs(model, result.model)


@pytest.mark.parametrize(
    "kwargs,reason",
    [
        ({"act": "Relu"}, None),  # not a chain at all: nothing matched
        ({"pads1": 1}, "padding"),
        ({"middle_is_output": True}, "graph output"),
    ],
)
def test_declines_with_reason(kwargs: dict, reason: str | None) -> None:
    model = chain_model(8, 32, 4, **kwargs)
    result = apply_pass(model, Fuse1x1Chain())
    assert not result.modified
    assert ops(result.model) == ops(model)
    if reason is None:
        assert result.skipped == []
    else:
        assert any(reason in s.reason for s in result.skipped), result.skipped


def test_declines_when_fusing_raises_macs() -> None:
    # bottleneck 32 -> 8 -> 32: before 32*8 + 8*32 = 512 MACs/pixel, after 32*32 = 1024.
    result = apply_pass(chain_model(32, 8, 32), Fuse1x1Chain())
    assert not result.modified
    assert any("raise MACs" in s.reason for s in result.skipped)


def test_weight_as_graph_input_is_skipped() -> None:
    model = parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 4, 5, 5] X, float[16, 4, 1, 1] W1) => (float[1, 2, 5, 5] Y)
        <float[2, 16, 1, 1] W2> {
            A = Conv <kernel_shape = [1, 1]> (X, W1)
            Y = Conv <kernel_shape = [1, 1]> (A, W2)
        }
    """)
    result = apply_pass(model, Fuse1x1Chain())
    assert not result.modified
    assert any("graph input" in s.reason or "not constant" in s.reason for s in result.skipped)


def test_constant_node_weights_are_fused() -> None:
    """PP-OCR style: weights held in Constant nodes rather than initializers."""
    rng = np.random.default_rng(5)
    w1 = numpy_helper.from_array(rng.standard_normal((16, 4, 1, 1)).astype(np.float32))
    w2 = numpy_helper.from_array(rng.standard_normal((2, 16, 1, 1)).astype(np.float32))
    nodes = [
        helper.make_node("Constant", [], ["W1"], value=w1, name="k1"),
        helper.make_node("Constant", [], ["W2"], value=w2, name="k2"),
        helper.make_node("Conv", ["X", "W1"], ["A"], name="c1", kernel_shape=[1, 1]),
        helper.make_node("Conv", ["A", "W2"], ["Y"], name="c2", kernel_shape=[1, 1]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, [1, 4, 6, 6])],
                              [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, [1, 2, 6, 6])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    result = apply_pass(model, Fuse1x1Chain())
    assert ops(result.model) == {"Conv": 1}
    assert_same_outputs(model, result.model)


def test_source_model_is_not_modified() -> None:
    model = chain_model(8, 32, 4)
    before = model.SerializeToString()
    apply_pass(model, Fuse1x1Chain())
    assert model.SerializeToString() == before


@pytest.mark.parametrize("g1,g2,c,m,o", [(1, 2, 8, 32, 4), (2, 1, 8, 32, 4), (4, 4, 8, 32, 8), (2, 2, 8, 64, 4)])
def test_grouped_chains_fuse_exactly(g1: int, g2: int, c: int, m: int, o: int) -> None:
    text = f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, {c}, 6, 6] X) => (float[1, {o}, 6, 6] Y)
        <float[{m}, {c // g1}, 1, 1] W1, float[{m}] B1, float[{o}, {m // g2}, 1, 1] W2, float[{o}] B2> {{
            A = Conv <kernel_shape = [1, 1], group = {g1}> (X, W1, B1)
            Y = Conv <kernel_shape = [1, 1], group = {g2}> (A, W2, B2)
        }}
    """
    model = parse(text)
    result = apply_pass(model, Fuse1x1Chain())
    assert ops(result.model) == {"Conv": 1}
    onnx.checker.check_model(result.model, full_check=True)
    assert_same_outputs(model, result.model)
    group = next(a.i for a in result.model.graph.node[0].attribute if a.name == "group")
    # Aligned blocks (same group count on both sides) stay grouped; otherwise the product is dense.
    assert group == (g1 if g1 == g2 else 1)


def test_block_diagonal_groups_and_back() -> None:
    from passes.fuse_1x1_chain import block_diagonal_groups, dense_weight, grouped_weight

    w = np.random.default_rng(0).standard_normal((8, 2, 1, 1))  # group 4: 8 outputs, 8 inputs
    dense = dense_weight(w, 4)
    assert dense.shape == (8, 8, 1, 1)
    assert block_diagonal_groups(dense) == 4
    np.testing.assert_array_equal(grouped_weight(dense, 4), w)
    dense[0, 7] = 1.0  # one entry off the blocks
    assert block_diagonal_groups(dense) == 1


@pytest.mark.parametrize("middle", [
    "M = BatchNormalization <epsilon = 0.001> (A, S, T, MEAN, VAR)",
    "M = Mul (A, K)",
    "M = Add (K, A)",
    "P = Mul (A, K)\n            M = Add (P, K2)",
])
def test_affine_between_is_folded(middle: str) -> None:
    model = parse(f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 8, 6, 6] X) => (float[1, 4, 3, 3] Y)
        <float[32, 8, 1, 1] W1, float[32] B1, float[4, 32, 1, 1] W2, float[32] S, float[32] T, float[32] MEAN,
         float[32] VAR, float[32, 1, 1] K, float[1, 32, 1, 1] K2> {{
            A = Conv <kernel_shape = [1, 1], strides = [2, 2]> (X, W1, B1)
            {middle}
            Y = Conv <kernel_shape = [1, 1]> (M, W2)
        }}
    """)
    result = apply_pass(model, Fuse1x1Chain())
    assert ops(result.model) == {"Conv": 1}
    assert len(result.applied[0].nodes) == 2 + middle.count("=") - middle.count("epsilon")
    onnx.checker.check_model(result.model, full_check=True)
    assert_same_outputs(model, result.model)


def test_affine_that_is_not_per_channel_is_skipped() -> None:
    model = parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 8, 6, 6] X) => (float[1, 4, 6, 6] Y)
        <float[32, 8, 1, 1] W1, float[4, 32, 1, 1] W2, float[1, 1, 6, 6] K> {
            A = Conv <kernel_shape = [1, 1]> (X, W1)
            M = Mul (A, K)
            Y = Conv <kernel_shape = [1, 1]> (M, W2)
        }
    """)
    result = apply_pass(model, Fuse1x1Chain())
    assert not result.modified
    assert any("does not broadcast per channel" in s.reason for s in result.skipped)
