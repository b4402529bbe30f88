"""conv1x1_to_gemm: the weight math alone, then each rule on tiny ONNX-text graphs against onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from passes.conv1x1_to_gemm import (
    Conv1x1ToGemm,
    chain_macs_per_row,
    conv1x1_as_pointwise,
    gemm_as_pointwise,
    gemm_row_bias,
)
from passes.fuse_1x1_chain import compose_pointwise
from rewriter.contract import Candidate, RewriteError
from rewriter.model import Model
from rewriter.pipeline import apply_pass
from tests.helpers import assert_same_outputs, ops, parse

# -- math -------------------------------------------------------------------------------------------------


def _gemm_reference(a, b, c, alpha, beta, trans_b):  # type: ignore[no-untyped-def]
    y = alpha * a @ (b.T if trans_b else b)
    return y if c is None else y + beta * c


@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.5, 2.0)])
@pytest.mark.parametrize("c_shape", [None, (), (1,), (4,), (1, 1), (1, 4)])
def test_gemm_as_pointwise_matches_gemm(trans_b: bool, alpha: float, beta: float, c_shape: tuple | None) -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 6))
    b = rng.standard_normal((4, 6) if trans_b else (6, 4))
    c = None if c_shape is None else rng.standard_normal(c_shape)
    w, bias = gemm_as_pointwise(b, c, alpha, beta, trans_b)
    assert w.shape == (4, 6)
    got = a @ w.T + (0 if bias is None else bias)
    np.testing.assert_allclose(got, _gemm_reference(a, b, c, alpha, beta, trans_b), rtol=1e-12)
    assert (bias is None) == (c is None)


@pytest.mark.parametrize("shape,ok", [((), True), ((1,), True), ((5,), True), ((1, 1), True), ((1, 5), True),
                                      ((3, 5), False), ((3, 1), False), ((2,), False), ((1, 1, 5), False)])
def test_gemm_row_bias_accepts_only_row_broadcasts(shape: tuple, ok: bool) -> None:
    c = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)
    row = gemm_row_bias(c, 5)
    assert (row is not None) == ok
    if ok:
        assert row is not None and row.shape == (5,)
        np.testing.assert_array_equal(np.broadcast_to(c, (3, 5)), np.broadcast_to(row, (3, 5)))


def test_gemm_as_pointwise_rejects_per_row_bias() -> None:
    with pytest.raises(ValueError, match="per row"):
        gemm_as_pointwise(np.ones((4, 6)), np.ones((3, 4)), 1.0, 1.0, True)


def test_conv1x1_then_gemm_composes() -> None:
    """Conv [O, C, 1, 1] on X [N, C, 1, 1], flattened, then Gemm(transB=0): one affine map of X's rows."""
    rng = np.random.default_rng(1)
    n, c, o, p = 2, 5, 7, 3
    x = rng.standard_normal((n, c, 1, 1))
    wc, bc = rng.standard_normal((o, c, 1, 1)), rng.standard_normal(o)
    b, cc = rng.standard_normal((o, p)), rng.standard_normal((1, p))
    conv = np.einsum("oc,nc->no", wc[:, :, 0, 0], x[:, :, 0, 0]) + bc
    want = _gemm_reference(conv, b, cc, 0.5, 2.0, False)
    w_lin, b_lin = gemm_as_pointwise(b, cc, 0.5, 2.0, False)
    w, bias = compose_pointwise(conv1x1_as_pointwise(wc), bc, w_lin, b_lin)
    assert bias is not None
    np.testing.assert_allclose(x.reshape(n, c) @ w.T + bias, want, rtol=1e-12)


def test_conv1x1_as_pointwise_does_not_copy_or_modify() -> None:
    wc = np.arange(12.0).reshape(4, 3, 1, 1)
    before = wc.copy()
    m = conv1x1_as_pointwise(wc)
    assert m.shape == (4, 3)
    np.testing.assert_array_equal(wc, before)


@pytest.mark.parametrize("k,h,n,lower", [(8, 64, 4, True), (32, 8, 32, False), (16, 16, 16, True), (4, 2, 4, False)])
def test_chain_macs_per_row(k: int, h: int, n: int, lower: bool) -> None:
    before, after = chain_macs_per_row(k, h, n)
    assert (before, after) == (k * h + h * n, k * n)
    assert (after < before) == lower


# -- models -----------------------------------------------------------------------------------------------


def head_model(*, opset: int = 17, bias: bool = True, rows: str = "flatten", linear: str = "gemm",
               trans_b: int = 1, alpha: float = 1.0, beta: float = 1.0, c_shape: str | None = "vec",
               n: int = 2, c: int = 16, o: int = 32, p: int = 4, hw: int = 5, extra: str = "",
               outputs: str = "") -> onnx.ModelProto:
    """GlobalAveragePool -> 1x1 conv -> Flatten/Reshape -> Gemm/MatMul, a classifier head."""
    decls = [f"float[{o}, {c}, 1, 1] Wc"]
    conv_in = "P, Wc"
    if bias:
        decls.append(f"float[{o}] Bc")
        conv_in += ", Bc"
    if rows == "flatten":
        rows_line = "F = Flatten <axis = 1> (H)"
    else:
        decls.append(f"int64[2] S = {{{rows}}}")
        rows_line = "F = Reshape (H, S)"
    if linear == "gemm":
        decls.append(f"float[{p}, {o}] Wg" if trans_b else f"float[{o}, {p}] Wg")
        args = "F, Wg"
        if c_shape is not None:
            shape = {"vec": f"[{p}]", "row": f"[1, {p}]", "scalar": "[1]", "per_row": f"[{n}, {p}]"}[c_shape]
            decls.append(f"float{shape} Cg")
            args += ", Cg"
        linear_line = f"Y = Gemm <transB = {trans_b}, alpha = {alpha}, beta = {beta}> ({args})"
    else:
        decls.append(f"float[{o}, {p}] Wg")
        linear_line = "Y = MatMul (F, Wg)"
    return parse(f"""
        <ir_version: 8, opset_import: ["" : {opset}]>
        g (float[{n}, {c}, {hw}, {hw}] X) => (float[{n}, {p}] Y{outputs})
        <{", ".join(decls)}> {{
            P = GlobalAveragePool (X)
            H = Conv <kernel_shape = [1, 1]> ({conv_in})
            {rows_line}
            {linear_line}
            {extra}
        }}
    """)


def check_rewrite(model: onnx.ModelProto, expected_ops: dict[str, int], applied: int | None = None):  # type: ignore[no-untyped-def]
    result = apply_pass(model, Conv1x1ToGemm())
    assert ops(result.model) == expected_ops, result.skipped
    if applied is not None:
        assert len(result.applied) == applied
    onnx.checker.check_model(result.model, full_check=True)
    assert [o.name for o in result.model.graph.output] == [o.name for o in model.graph.output]
    assert_same_outputs(model, result.model)
    return result


# -- conv_into_gemm ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("opset", [13, 17])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.5, 2.0)])
@pytest.mark.parametrize("c_shape", ["vec", "row", "scalar", None])
def test_conv_into_gemm(opset: int, bias: bool, trans_b: int, alpha: float, beta: float, c_shape: str | None) -> None:
    model = head_model(opset=opset, bias=bias, trans_b=trans_b, alpha=alpha, beta=beta, c_shape=c_shape)
    result = check_rewrite(model, {"Flatten": 1, "Gemm": 1, "GlobalAveragePool": 1}, applied=1)
    assert "fold 1x1 conv" in result.applied[0].description
    cost = result.applied[0].cost
    assert (cost.macs_before, cost.macs_after) == (2 * (16 * 32 + 32 * 4), 2 * 16 * 4)


@pytest.mark.parametrize("opset", [13, 17])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_into_matmul(opset: int, bias: bool) -> None:
    """MatMul head: stays a MatMul without a conv bias, becomes a Gemm carrying the folded bias with one."""
    model = head_model(opset=opset, bias=bias, linear="matmul")
    check_rewrite(model, {"Flatten": 1, "Gemm" if bias else "MatMul": 1, "GlobalAveragePool": 1}, applied=1)


@pytest.mark.parametrize("rows", ["flatten", "0, -1", "-1, 32", "2, 32"])
def test_conv_into_gemm_through_reshape(rows: str) -> None:
    check_rewrite(head_model(rows=rows), {"Flatten": 1, "Gemm": 1, "GlobalAveragePool": 1}, applied=1)


def test_bottleneck_head_falls_back_to_conv_as_gemm() -> None:
    """[32 -> 8 -> 32]: folding raises MACs, so the conv and Flatten become Flatten + Gemm and stop there."""
    model = head_model(c=32, o=8, p=32)
    result = check_rewrite(model, {"Gemm": 2, "Flatten": 1, "GlobalAveragePool": 1}, applied=1)
    reasons = [s.reason for s in result.skipped]
    assert any("conv_into_gemm" in r and "raise MACs per row from 512 to 1024" in r for r in reasons), reasons
    assert any("gemm_chain" in r and "raise MACs" in r for r in reasons), reasons


# -- conv_as_gemm -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("opset", [10, 13, 17])  # before opset 11 Gemm needs C: a bias-free conv gets zeros
@pytest.mark.parametrize("bias", [True, False])
def test_se_block_convs_become_gemms(opset: int, bias: bool) -> None:
    b1, b2 = (", B1", ", B2") if bias else ("", "")
    model = parse(f"""
        <ir_version: 8, opset_import: ["" : {opset}]>
        g (float[2, 16, 6, 6] X) => (float[2, 16, 6, 6] Y)
        <float[4, 16, 1, 1] W1, float[4] B1, float[16, 4, 1, 1] W2, float[16] B2> {{
            P = GlobalAveragePool (X)
            A = Conv <kernel_shape = [1, 1]> (P, W1{b1})
            R = Relu (A)
            S = Conv <kernel_shape = [1, 1], strides = [2, 2]> (R, W2{b2})
            G = Sigmoid (S)
            Y = Mul (X, G)
        }}
    """)
    result = check_rewrite(model, {"Flatten": 2, "Gemm": 2, "Reshape": 2, "GlobalAveragePool": 1, "Mul": 1,
                                   "Relu": 1, "Sigmoid": 1}, applied=2)
    for cand in result.applied:
        assert "two extra reshapes" in cand.description
        assert cand.cost.macs_before == cand.cost.macs_after > 0


def test_conv_and_flatten_without_gemm_become_flatten_and_gemm() -> None:
    model = parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 8, 3, 3] X) => (float[1, 6] Y)
        <float[6, 8, 1, 1] W, float[6] B> {
            P = GlobalAveragePool (X)
            H = Conv <kernel_shape = [1, 1]> (P, W, B)
            F = Flatten (H)
            Y = Relu (F)
        }
    """)
    result = check_rewrite(model, {"Flatten": 1, "Gemm": 1, "GlobalAveragePool": 1, "Relu": 1}, applied=1)
    assert result.applied[0].nodes == ("Conv_1", "Flatten_2")
    assert "same node count" in result.applied[0].description


def test_conv_output_that_is_a_graph_output_keeps_its_name() -> None:
    """The conv's output is also a model output: no fold, the conv alone becomes Flatten + Gemm + Reshape."""
    model = head_model(outputs=", float[2, 32, 1, 1] H")
    result = check_rewrite(model, {"Flatten": 2, "Gemm": 2, "Reshape": 1, "GlobalAveragePool": 1})
    assert any("'H' is a graph output" in s.reason for s in result.skipped), result.skipped


# -- gemm_chain -------------------------------------------------------------------------------------------


def chain_model(op1: str, op2: str, *, opset: int = 17, trans_b: int = 1, alpha: float = 1.0, beta: float = 1.0,
                bias: bool = True, k: int = 8, h: int = 64, n: int = 4, m: int = 3, extra: str = "",
                outputs: str = "") -> onnx.ModelProto:
    decls, lines = [], []
    for i, (op, src, dst, fan_in, fan_out) in enumerate([(op1, "X", "H", k, h), (op2, "H", "Y", h, n)], 1):
        if op == "MatMul":
            decls.append(f"float[{fan_in}, {fan_out}] B{i}")
            lines.append(f"{dst} = MatMul ({src}, B{i})")
            continue
        decls.append(f"float[{fan_out}, {fan_in}] B{i}" if trans_b else f"float[{fan_in}, {fan_out}] B{i}")
        args = f"{src}, B{i}"
        if bias:
            decls.append(f"float[{fan_out}] C{i}")
            args += f", C{i}"
        lines.append(f"{dst} = Gemm <transB = {trans_b}, alpha = {alpha}, beta = {beta}> ({args})")
    body = "\n".join(lines)
    return parse(f"""
        <ir_version: 8, opset_import: ["" : {opset}]>
        g (float[{m}, {k}] X) => (float[{m}, {n}] Y{outputs})
        <{", ".join(decls)}> {{
            {body}
            {extra}
        }}
    """)


@pytest.mark.parametrize("opset", [13, 17])
@pytest.mark.parametrize("op1,op2", [("Gemm", "Gemm"), ("MatMul", "MatMul"), ("MatMul", "Gemm"), ("Gemm", "MatMul")])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.5, 2.0)])
@pytest.mark.parametrize("bias", [True, False])
def test_gemm_chain(opset: int, op1: str, op2: str, trans_b: int, alpha: float, beta: float, bias: bool) -> None:
    model = chain_model(op1, op2, opset=opset, trans_b=trans_b, alpha=alpha, beta=beta, bias=bias)
    fused = "MatMul" if op1 == op2 == "MatMul" else "Gemm"
    result = check_rewrite(model, {fused: 1}, applied=1)
    cost = result.applied[0].cost
    assert (cost.macs_before, cost.macs_after) == (3 * (8 * 64 + 64 * 4), 3 * 8 * 4)


def test_matmul_chain_on_rank_3_activations() -> None:
    model = parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 5, 8] X) => (float[2, 5, 4] Y)
        <float[8, 64] B1, float[64, 4] B2> {
            H = MatMul (X, B1)
            Y = MatMul (H, B2)
        }
    """)
    check_rewrite(model, {"MatMul": 1}, applied=1)


def test_gemm_chain_of_three_reaches_fixed_point() -> None:
    model = parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 8] X) => (float[2, 4] Y)
        <float[64, 8] B1, float[64] C1, float[64, 64] B2, float[4, 64] B3, float[4] C3> {
            H1 = Gemm <transB = 1> (X, B1, C1)
            H2 = MatMul (H1, B2)
            Y = Gemm <transB = 1, alpha = 0.25> (H2, B3, C3)
        }
    """)
    check_rewrite(model, {"Gemm": 1})


def test_head_then_gemm_reaches_fixed_point() -> None:
    """Conv -> Flatten -> Gemm -> Gemm: the fold, then the chain, down to Flatten + one Gemm."""
    model = parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 16, 5, 5] X) => (float[2, 4] Z)
        <float[32, 16, 1, 1] Wc, float[32] Bc, float[16, 32] Wg, float[16] Cg, float[4, 16] W3, float[4] C3> {
            P = GlobalAveragePool (X)
            H = Conv <kernel_shape = [1, 1]> (P, Wc, Bc)
            F = Flatten (H)
            Y = Gemm <transB = 1> (F, Wg, Cg)
            Z = Gemm <transB = 1> (Y, W3, C3)
        }
    """)
    result = check_rewrite(model, {"Flatten": 1, "Gemm": 1, "GlobalAveragePool": 1})
    assert len(result.applied) == 2


# -- declines ---------------------------------------------------------------------------------------------


def assert_declined(model: onnx.ModelProto, *needles: str):  # type: ignore[no-untyped-def]
    result = apply_pass(model, Conv1x1ToGemm())
    assert not result.modified, result.applied
    assert ops(result.model) == ops(model)
    reasons = [s.reason for s in result.skipped]
    for needle in needles:
        assert any(needle in r for r in reasons), reasons
    return result


def test_declines_7x7_spatial() -> None:
    model = parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 8, 7, 7] X) => (float[1, 4] Y)
        <float[16, 8, 1, 1] Wc, float[4, 784] Wg> {
            H = Conv <kernel_shape = [1, 1]> (X, Wc)
            F = Flatten (H)
            Y = Gemm <transB = 1> (F, Wg)
        }
    """)
    result = assert_declined(model, "input spatial size is 7x7, not 1x1")
    assert len(result.skipped) == 1  # the same reason from both conv rules is reported once


def test_declines_unknown_spatial_size() -> None:
    model = parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 8, 4, 4] X, int64[4] S) => (float[1, 4] Y)
        <float[16, 8, 1, 1] Wc, float[4, 16] Wg> {
            R = Reshape (X, S)
            H = Conv <kernel_shape = [1, 1]> (R, Wc)
            F = Flatten (H)
            Y = Gemm <transB = 1> (F, Wg)
        }
    """)
    assert_declined(model, "unknown; cannot tell whether the spatial size is 1x1")


def test_declines_padded_conv() -> None:
    model = head_model()
    conv = next(nd for nd in model.graph.node if nd.op_type == "Conv")
    conv.attribute.append(onnx.helper.make_attribute("pads", [1, 1, 1, 1]))
    assert_declined(model, "padding")


def test_flatten_used_twice_is_not_folded() -> None:
    """Flatten's output feeds the Gemm and a Relu: no fold; the conv + Flatten still become Flatten + Gemm."""
    model = head_model(extra="Z = Relu (F)", outputs=", float[2, 32] Z")
    result = check_rewrite(model, {"Gemm": 2, "Flatten": 1, "GlobalAveragePool": 1, "Relu": 1}, applied=1)
    reasons = [s.reason for s in result.skipped]
    assert any("conv_into_gemm" in r and "'F' has 2 consumers" in r for r in reasons), reasons
    assert any("gemm_chain" in r and "has 2 consumers" in r for r in reasons), reasons


def test_declines_chain_that_would_raise_macs() -> None:
    result = assert_declined(chain_model("Gemm", "Gemm", k=32, h=8, n=32),
                             "fusing [32->8->32] would raise MACs per row: K*N = 1024 >= K*H + H*N = 512")
    assert all(s.nodes == ("Gemm_0", "Gemm_1") for s in result.skipped)


def test_declines_chain_with_intermediate_output() -> None:
    assert_declined(chain_model("Gemm", "Gemm", outputs=", float[3, 64] H"), "'H' is a graph output")


def test_declines_weight_that_is_a_graph_input() -> None:
    model = parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[3, 8] X, float[8, 64] B1) => (float[3, 4] Y)
        <float[64, 4] B2> {
            H = MatMul (X, B1)
            Y = MatMul (H, B2)
        }
    """)
    assert_declined(model, "'B1' is a graph input, not a constant")


def test_declines_transposed_a() -> None:
    model = parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[8, 3] X) => (float[3, 4] Y)
        <float[8, 64] B1, float[64, 4] B2> {
            H = Gemm <transA = 1> (X, B1)
            Y = MatMul (H, B2)
        }
    """)
    assert_declined(model, "transA=1")


def test_per_row_gemm_bias_is_not_folded() -> None:
    model = head_model(c_shape="per_row")
    result = check_rewrite(model, {"Gemm": 2, "Flatten": 1, "GlobalAveragePool": 1}, applied=1)
    assert any("varies per row" in s.reason for s in result.skipped), result.skipped


def test_source_model_is_not_modified() -> None:
    model = head_model()
    before = model.SerializeToString()
    apply_pass(model, Conv1x1ToGemm())
    assert model.SerializeToString() == before


def test_stale_candidate_raises() -> None:
    model = Model.from_source(head_model())
    (cand,) = [c for c in Conv1x1ToGemm().find(model) if isinstance(c, Candidate)]
    trial = model.fork()
    Conv1x1ToGemm().apply(trial, cand)
    with pytest.raises(RewriteError):
        Conv1x1ToGemm().apply(trial, cand)
