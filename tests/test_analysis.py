"""MAC and parameter counts against hand-computed numbers, and the ranking of expensive convs.

Convention (rewriter.analysis): one MAC is one multiply-add; bias adds are not counted. Params are the
elements of floating-point constant inputs, each shared constant counted once.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from rewriter.analysis import analyze, gemm_macs, matmul_macs
from rewriter.model import Model
from tests.helpers import parse


def with_weights(text: str, *weights: str, seed: int = 0) -> onnx.ModelProto:
    """Parse ``text`` (weights declared as graph inputs) and turn ``weights`` into random initializers."""
    model = parse(text)
    rng = np.random.default_rng(seed)
    keep = []
    for vi in model.graph.input:
        if vi.name in weights:
            shape = [d.dim_value for d in vi.type.tensor_type.shape.dim]
            model.graph.initializer.append(numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), vi.name))
        else:
            keep.append(vi)
    assert len(keep) + len(weights) == len(model.graph.input), "a weight name is not a graph input"
    del model.graph.input[:]
    model.graph.input.extend(keep)
    onnx.checker.check_model(model, full_check=True)
    return model


def cost_of(model: onnx.ModelProto, op: str):  # type: ignore[no-untyped-def]
    result = analyze(Model.from_source(model))
    (cost,) = [c for c in result.nodes if c.op == op]
    return cost, result


# -- Conv ----------------------------------------------------------------------------------------------
def conv_model(x: str, w: str, y: str, attrs: str) -> onnx.ModelProto:
    return with_weights(
        f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[{x}] x, float[{w}] W, float[{w.split(',')[0]}] B) => (float[{y}] y) {{
            y = Conv <{attrs}> (x, W, B)
        }}
        """,
        "W", "B",
    )


@pytest.mark.parametrize(
    ("x", "w", "y", "attrs", "macs", "params"),
    [
        # 1x16x32x32, 32 out, 3x3, stride 2, pad 1, group 4:
        #   H_out = floor((32 + 1 + 1 - 3) / 2) + 1 = 15 + 1 = 16
        #   MACs  = N * C_out * H_out * W_out * (C_in / group) * kh * kw = 1 * 32 * 16 * 16 * (16 / 4) * 3 * 3
        #         = 32 * 256 * 36 = 294912
        #   params = W 32 * 4 * 3 * 3 + B 32 = 1152 + 32 = 1184
        ("1,16,32,32", "32,4,3,3", "1,32,16,16",
         "group = 4, strides = [2, 2], pads = [1, 1, 1, 1]", 294912, 1184),
        # Same with dilation 2: effective kernel 2 * (3 - 1) + 1 = 5
        #   H_out = floor((32 + 1 + 1 - 5) / 2) + 1 = 14 + 1 = 15
        #   MACs  = 1 * 32 * 15 * 15 * 4 * 3 * 3 = 32 * 225 * 36 = 259200
        ("1,16,32,32", "32,4,3,3", "1,32,15,15",
         "group = 4, strides = [2, 2], pads = [1, 1, 1, 1], dilations = [2, 2]", 259200, 1184),
        # Batch 2, asymmetric pads and a rectangular kernel, group 1:
        #   x 2x8x10x12, W 6x8x3x5, strides [1, 2], pads [top 0, left 2, bottom 2, right 2]
        #   H_out = floor((10 + 0 + 2 - 3) / 1) + 1 = 10;  W_out = floor((12 + 2 + 2 - 5) / 2) + 1 = 5 + 1 = 6
        #   MACs  = 2 * 6 * 10 * 6 * 8 * 3 * 5 = 720 * 120 = 86400
        #   params = 6 * 8 * 3 * 5 + 6 = 720 + 6 = 726
        ("2,8,10,12", "6,8,3,5", "2,6,10,6",
         "strides = [1, 2], pads = [0, 2, 2, 2]", 86400, 726),
        # Depthwise: x 1x32x16x16, W 32x1x3x3, group 32, pad 1, stride 1 -> 1x32x16x16
        #   MACs  = 1 * 32 * 16 * 16 * (32 / 32) * 3 * 3 = 8192 * 9 = 73728
        #   params = 32 * 1 * 3 * 3 + 32 = 288 + 32 = 320
        ("1,32,16,16", "32,1,3,3", "1,32,16,16",
         "group = 32, pads = [1, 1, 1, 1]", 73728, 320),
    ],
    ids=["group4-stride2-pad1", "group4-stride2-dilation2", "batch2-rect-asym-pads", "depthwise"],
)
def test_conv_macs_and_params(x: str, w: str, y: str, attrs: str, macs: int, params: int) -> None:
    cost, result = cost_of(conv_model(x, w, y, attrs), "Conv")
    assert cost.output_shape == tuple(int(d) for d in y.split(","))
    assert cost.macs == macs
    assert cost.params == params
    assert result.total_macs == macs
    assert result.total_params == params
    c_out, c_in_per_group = (int(d) for d in w.split(",")[:2])
    assert cost.out_channels == c_out
    assert cost.in_channels == int(x.split(",")[1])
    assert cost.in_channels == c_in_per_group * cost.group


def test_conv_with_symbolic_batch_uses_the_resolved_batch() -> None:
    model = conv_model("N,16,32,32", "32,4,3,3", "N,32,16,16", "group = 4, strides = [2, 2], pads = [1, 1, 1, 1]")
    # Batch defaults to 1: 294912 as above; batch 3 triples it: 3 * 294912 = 884736.
    assert analyze(Model.from_source(model)).total_macs == 294912
    assert analyze(Model.from_source(model, {"x": (3, 16, 32, 32)})).total_macs == 884736


# -- ConvTranspose -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("w", "group", "y", "macs", "c_out"),
    [
        # x 1x8x10x10, W 8x4x3x3 (C_in x C_out/group x k x k), stride 2, no pads:
        #   H_out = (10 - 1) * 2 + 3 = 21
        #   MACs  = N * C_in * H_in * W_in * (C_out / group) * kh * kw = 1 * 8 * 10 * 10 * 4 * 3 * 3 = 800 * 36 = 28800
        ("8,4,3,3", 1, "1,4,21,21", 28800, 4),
        # group 2: W 8x2x3x3, C_out = 2 * 2 = 4; MACs = 8 * 100 * 2 * 9 = 14400
        ("8,2,3,3", 2, "1,4,21,21", 14400, 4),
    ],
)
def test_conv_transpose_macs(w: str, group: int, y: str, macs: int, c_out: int) -> None:
    model = with_weights(
        f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1,8,10,10] x, float[{w}] W) => (float[{y}] y) {{
            y = ConvTranspose <strides = [2, 2], group = {group}> (x, W)
        }}
        """,
        "W",
    )
    cost, result = cost_of(model, "ConvTranspose")
    assert cost.macs == macs
    assert cost.output_shape == (1, 4, 21, 21)
    assert (cost.in_channels, cost.out_channels) == (8, c_out)
    assert cost.params == result.total_params == int(np.prod([int(d) for d in w.split(",")]))  # 288 or 144
    assert not cost.is_dense_kxk_conv  # a ConvTranspose is never ranked as a dense conv


# -- Gemm ----------------------------------------------------------------------------------------------
def test_gemm_with_trans_b() -> None:
    model = with_weights(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[4,64] a, float[10,64] W, float[10] B) => (float[4,10] y) {
            y = Gemm <transB = 1> (a, W, B)
        }
        """,
        "W", "B",
    )
    cost, result = cost_of(model, "Gemm")
    # M = 4, K = 64, N = 10 (B is [N, K] under transB): MACs = 4 * 64 * 10 = 2560
    assert cost.macs == 2560
    # params = W 10 * 64 + B 10 = 650
    assert cost.params == 650 == result.total_params
    assert cost.output_shape == (4, 10)


def test_gemm_with_trans_a() -> None:
    model = with_weights(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[64,4] a, float[64,10] W) => (float[4,10] y) {
            y = Gemm <transA = 1> (a, W)
        }
        """,
        "W",
    )
    cost, _ = cost_of(model, "Gemm")
    # A is [K, M] = [64, 4] under transA: M = 4, K = 64, N = 10 -> 2560
    assert cost.macs == 2560


@pytest.mark.parametrize(
    ("a", "b", "ta", "tb", "macs"),
    [
        ((4, 64), (64, 10), 0, 0, 4 * 64 * 10),
        ((4, 64), (10, 64), 0, 1, 4 * 64 * 10),
        ((64, 4), (64, 10), 1, 0, 4 * 64 * 10),
        ((64, 4), (10, 64), 1, 1, 4 * 64 * 10),
        ((3, 5), (5, 7), 0, 0, 105),  # 3 * 5 * 7
    ],
)
def test_gemm_macs_function(a: tuple[int, ...], b: tuple[int, ...], ta: int, tb: int, macs: int) -> None:
    assert gemm_macs(a, b, ta, tb) == macs


# -- MatMul --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("a", "b", "macs"),
    [
        # plain 2-D: M=4, K=5, N=6 -> 120
        ((4, 5), (5, 6), 120),
        # batch broadcasting, right-aligned: (2, 1, 3) vs (7, 3) -> (2, 7, 3) = 42; M=4, K=5, N=6 -> 42 * 120 = 5040
        ((2, 1, 3, 4, 5), (7, 3, 5, 6), 5040),
        # (2, 1) vs (7,) -> (2, 7) = 14; 14 * 120 = 1680
        ((2, 1, 4, 5), (7, 5, 6), 1680),
        # shared B: batch (8,) vs () -> 8; 8 * 4 * 5 * 6 = 960
        ((8, 4, 5), (5, 6), 960),
        # 1-D A is [1, K]: M=1, K=5, N=6 -> 30
        ((5,), (5, 6), 30),
        # 1-D B is [K, 1]: batch 3, M=4, K=5, N=1 -> 60
        ((3, 4, 5), (5,), 60),
        # both 1-D (a dot product): 5
        ((5,), (5,), 5),
        # 1-D A against batched B: batch 2, M=1, K=5, N=6 -> 60
        ((5,), (2, 5, 6), 60),
    ],
)
def test_matmul_macs_function(a: tuple[int, ...], b: tuple[int, ...], macs: int) -> None:
    assert matmul_macs(a, b) == macs
    # Cross-check the broadcast result shape against numpy for the same operands.
    out = np.matmul(np.zeros(a), np.zeros(b))
    k = a[-1]
    assert macs == int(np.prod(out.shape, dtype=np.int64)) * k


def test_matmul_node_with_batch_broadcasting() -> None:
    model = with_weights(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2,3,4,5] a, float[5,6] W) => (float[2,3,4,6] y) {
            y = MatMul(a, W)
        }
        """,
        "W",
    )
    cost, result = cost_of(model, "MatMul")
    # batch 2 * 3 = 6, M=4, K=5, N=6: 6 * 4 * 5 * 6 = 720; params W = 30
    assert cost.macs == 720 == result.total_macs
    assert cost.params == 30


def test_matmul_of_two_runtime_inputs_has_macs_and_no_params() -> None:
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2,1,4,5] a, float[3,5,6] b) => (float[2,3,4,6] y) {
            y = MatMul(a, b)
        }
        """
    )
    cost, result = cost_of(model, "MatMul")
    # batch (2, 1) vs (3,) -> (2, 3) = 6; 6 * 4 * 5 * 6 = 720
    assert cost.macs == 720
    assert cost.params == 0 == result.total_params


# -- params --------------------------------------------------------------------------------------------
def test_shared_constants_are_counted_once_and_integer_constants_not_at_all() -> None:
    model = with_weights(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1,8,4,4] x, float[8,8,1,1] W, float[8] B, int64[2] S) => (float[1,128] y) {
            c1 = Conv(x, W, B)
            r1 = Relu(c1)
            c2 = Conv(r1, W, B)
            y = Reshape(c2, S)
        }
        """,
        "W", "B",
    )
    model.graph.initializer.append(numpy_helper.from_array(np.array([1, 128], np.int64), "S"))
    model.graph.input.pop()  # S is now an initializer
    onnx.checker.check_model(model, full_check=True)
    result = analyze(Model.from_source(model))
    convs = [c for c in result.nodes if c.op == "Conv"]
    # Each conv reads W (8 * 8 * 1 * 1 = 64) and B (8): 72 per node ...
    assert [c.params for c in convs] == [72, 72]
    # ... but the model holds them once: 72, not 144. The int64 shape S is not a parameter.
    assert result.total_params == 72
    assert next(c for c in result.nodes if c.op == "Reshape").params == 0
    # MACs: each conv 1 * 8 * 4 * 4 * 8 * 1 * 1 = 1024; total 2048.
    assert [c.macs for c in convs] == [1024, 1024]
    assert result.total_macs == 2048


def test_constant_node_weights_count_as_params() -> None:
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2,3] a) => (float[2,2] y) {
            w = Constant <value = float[3,2] {1.0, 2.0, 3.0, 4.0, 5.0, 6.0}> ()
            y = MatMul(a, w)
        }
        """
    )
    cost, result = cost_of(model, "MatMul")
    # M=2, K=3, N=2 -> 12 MACs; the Constant's 6 floats are params.
    assert cost.macs == 12
    assert cost.params == 6 == result.total_params


# -- ranking -------------------------------------------------------------------------------------------
RANK_NET = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[1,8,16,16] x, float[16,8,3,3] W3, float[16,16,1,1] W1, float[16,1,3,3] Wd, float[8,16,5,5] W5)
  => (float[1,8,16,16] y) {
    a = Conv <pads = [1, 1, 1, 1]> (x, W3)
    b = Conv (a, W1)
    c = Conv <group = 16, pads = [1, 1, 1, 1]> (b, Wd)
    y = Conv <pads = [2, 2, 2, 2]> (c, W5)
}
"""
# All outputs 16x16 spatial (256 positions):
#   dense 3x3 8->16:   16 * 256 * 8 * 9   = 294912
#   1x1 16->16:        16 * 256 * 16      =  65536
#   depthwise 3x3 16:  16 * 256 * 1 * 9   =  36864
#   dense 5x5 16->8:    8 * 256 * 16 * 25 = 819200
#   total:             294912 + 65536 + 36864 + 819200 = 1216512
RANK_MACS = {"dense3": 294912, "pointwise": 65536, "depthwise": 36864, "dense5": 819200}
RANK_TOTAL = 1216512


def rank_model() -> Model:
    proto = with_weights(RANK_NET, "W3", "W1", "Wd", "W5")
    for node, name in zip(proto.graph.node, ["dense3", "pointwise", "depthwise", "dense5"]):
        node.name = name
    return Model.from_source(proto)


def test_every_conv_of_the_ranking_net_has_its_hand_computed_macs() -> None:
    result = analyze(rank_model())
    assert {c.name: c.macs for c in result.nodes} == RANK_MACS
    assert result.total_macs == RANK_TOTAL
    assert result.histogram == {"Conv": 4}


def test_expensive_convs_ranks_dense_kxk_only() -> None:
    ranked = analyze(rank_model()).expensive_convs()
    # The 1x1 and the depthwise 3x3 are not dense KxK convs; the 5x5 has the most MACs.
    assert [c.name for c, _ in ranked] == ["dense5", "dense3"]
    shares = [share for _, share in ranked]
    assert shares == pytest.approx([819200 / 1216512, 294912 / 1216512])  # 0.6734, 0.2424
    assert sum(shares) == pytest.approx((819200 + 294912) / 1216512)  # 0.9158: the rest is 1x1 + depthwise
    assert sum(shares) < 1.0


def test_expensive_convs_min_kernel() -> None:
    ranked = analyze(rank_model()).expensive_convs(min_kernel=5)
    assert [c.name for c, _ in ranked] == ["dense5"]


def test_analysis_to_dict_is_json_and_honours_top() -> None:
    result = analyze(rank_model())
    data = json.loads(json.dumps(result.to_dict(top=1)))
    assert data["total_macs"] == RANK_TOTAL
    assert [c["name"] for c in data["expensive_convs"]] == ["dense5"]
    assert data["expensive_convs"][0]["share"] == pytest.approx(819200 / 1216512)
    assert len(data["nodes"]) == 4
    assert len(result.to_dict()["expensive_convs"]) == 2


def test_unsized_conv_counts_zero_macs_but_keeps_its_params() -> None:
    """A conv whose output shape inference cannot know (its input comes from a custom op) is not guessed."""
    model = onnx.parser.parse_model(
        """
        <ir_version: 8, opset_import: ["" : 17, "com.example" : 1]>
        g (float[1,4,8,8] x) => (float y)
          <float[2,4,1,1] W = {1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0}> {
            m = com.example.Mystery(x)
            y = Conv(m, W)
        }
        """
    )
    cost, result = cost_of(model, "Conv")
    assert cost.macs == 0
    assert cost.params == 8 == result.total_params
