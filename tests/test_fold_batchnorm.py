"""fold_batchnorm: the weight math alone, then the pass on tiny ONNX-text models (rewrite, checker,
numerics through onnxruntime), then every skip reason."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest

from passes.common import batchnorm_scale_shift
from passes.fold_batchnorm import (
    FoldBatchNorm,
    fold_bias,
    fold_conv,
    fold_conv_transpose,
    fold_gemm,
    per_channel_vector,
)
from rewriter.contract import Candidate, RewriteError
from rewriter.io import copy_model, normalize_model
from rewriter.model import Model, name_nodes
from rewriter.pipeline import apply_pass
from tests.helpers import assert_same_outputs, ops, parse

IR = {7: 3, 9: 4, 11: 6, 13: 7, 15: 8, 17: 8}


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def lit(a: np.ndarray) -> str:
    """An array as an ONNX-text tensor literal body."""
    return "{" + ",".join(f"{float(x):.9g}" for x in np.asarray(a).ravel()) + "}"


def ttype(a: np.ndarray) -> str:
    """The ONNX-text tensor type ``float[d0,d1]`` (``float`` for a scalar) of a float32 array."""
    return f"float[{','.join(str(d) for d in a.shape)}]" if a.ndim else "float"


def decl(name: str, a: np.ndarray) -> str:
    """An initializer declaration ``float[d0,d1] name = {...}``."""
    return f"{ttype(a)} {name} = {lit(a)}"


def bn_stats(c: int, seed: int = 1) -> dict[str, np.ndarray]:
    r = rng(seed)
    return {
        "gamma": r.uniform(0.5, 2.0, c).astype(np.float32) * r.choice([-1, 1], c).astype(np.float32),
        "beta": r.standard_normal(c).astype(np.float32),
        "mean": r.standard_normal(c).astype(np.float32),
        "var": r.uniform(0.1, 3.0, c).astype(np.float32),
    }


def header(opset: int) -> str:
    return f'<ir_version: {IR[opset]}, opset_import: ["" : {opset}]>'


def shapes_str(shape: tuple[int, ...]) -> str:
    return ",".join(str(d) for d in shape)


# ------------------------------------------------------------------------------------------------
# Model builders (ONNX text)
# ------------------------------------------------------------------------------------------------

GROUPS = {"g1": (4, 6, 1), "g2": (4, 6, 2), "dw": (4, 8, 4)}  # (C_in, C_out, group)
GEOMETRY = [(1, 1, 0), (1, 2, 1), (3, 1, 1), (3, 2, 0)]  # (kernel, stride, pad)
H = W_ = 7


def conv_out_hw(op: str, k: int, s: int, p: int) -> int:
    if op == "Conv":
        return (H + 2 * p - k) // s + 1
    return (H - 1) * s - 2 * p + k


def conv_weights(op: str, cin: int, cout: int, group: int, k: int, seed: int = 2) -> np.ndarray:
    shape = (cout, cin // group, k, k) if op == "Conv" else (cin, cout // group, k, k)
    return rng(seed).standard_normal(shape).astype(np.float32)


def conv_bn_model(
    op: str = "Conv",
    *,
    opset: int = 13,
    groups: str = "g1",
    k: int = 3,
    stride: int = 1,
    pad: int = 1,
    bias: bool = True,
    constants: bool = False,
    eps: float = 1e-3,
) -> onnx.ModelProto:
    """x -> Conv/ConvTranspose -> BatchNormalization -> y. ``constants``: weights as Constant nodes."""
    cin, cout, group = GROUPS[groups]
    w = conv_weights(op, cin, cout, group, k)
    b = rng(3).standard_normal(cout).astype(np.float32)
    params = {"W": w, **({"b": b} if bias else {}), **bn_stats(cout)}
    hw = conv_out_hw(op, k, stride, pad)
    if constants:
        inits = ""
        body = "".join(f"  {n} = Constant <value = {ttype(v)} {lit(v)}> ()\n" for n, v in params.items())
    else:
        inits = "<" + ", ".join(decl(n, v) for n, v in params.items()) + ">"
        body = ""
    conv_in = "x, W, b" if bias else "x, W"
    return parse(f"""
{header(opset)}
g (float[1,{cin},{H},{W_}] x) => (float[1,{cout},{hw},{hw}] y)
{inits}
{{
{body}  c = {op} <kernel_shape = [{k},{k}], strides = [{stride},{stride}], pads = [{pad},{pad},{pad},{pad}], group = {group}> ({conv_in})
  y = BatchNormalization <epsilon = {eps}> (c, gamma, beta, mean, var)
}}
""")


def gemm_bn_model(
    *, opset: int = 13, trans_a: int = 0, trans_b: int = 0, bias: str = "n", alpha: float = 1.0, beta: float = 1.0
) -> onnx.ModelProto:
    """x[M,K] -> Gemm -> BatchNormalization -> y[M,N]. ``bias``: none, n ([N]), 1n ([1,N]), 1 ([1])."""
    m, k, n = 3, 5, 4
    r = rng(4)
    b_mat = r.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    c_shape = {"none": None, "n": (n,), "1n": (1, n), "1": (1,)}[bias]
    params = {"B": b_mat}
    if c_shape is not None:
        params["C"] = r.standard_normal(c_shape).astype(np.float32)
    params.update(bn_stats(n))
    x_shape = (k, m) if trans_a else (m, k)
    inputs = "x, B, C" if c_shape is not None else "x, B"
    return parse(f"""
{header(opset)}
g (float[{shapes_str(x_shape)}] x) => (float[{m},{n}] y)
<{", ".join(decl(nm, v) for nm, v in params.items())}>
{{
  c = Gemm <transA = {trans_a}, transB = {trans_b}, alpha = {alpha}, beta = {beta}> ({inputs})
  y = BatchNormalization <epsilon = 1e-5> (c, gamma, beta, mean, var)
}}
""")


def conv_affine_model(
    ops_: list[tuple[str, tuple[int, ...], bool]],
    *,
    op: str = "Conv",
    opset: int = 13,
    bias: bool = True,
) -> onnx.ModelProto:
    """x -> conv -> (Mul|Add by a constant of the given shape, constant first when ``swap``)* -> y."""
    cin, cout, group = GROUPS["g2"]
    w = conv_weights(op, cin, cout, group, 3)
    params = {"W": w}
    if bias:
        params["b"] = rng(3).standard_normal(cout).astype(np.float32)
    hw = conv_out_hw(op, 3, 1, 1)
    lines = [f"  c0 = {op} <kernel_shape = [3,3], pads = [1,1,1,1], group = {group}> ({'x, W, b' if bias else 'x, W'})"]
    for i, (kind, shape, swap) in enumerate(ops_):
        params[f"k{i}"] = rng(10 + i).uniform(0.5, 1.5, shape).astype(np.float32) * (1 if kind == "Mul" else -1)
        args = f"k{i}, c{i}" if swap else f"c{i}, k{i}"
        out = "y" if i == len(ops_) - 1 else f"c{i + 1}"
        lines.append(f"  {out} = {kind}({args})")
    body = "\n".join(lines)
    return parse(f"""
{header(opset)}
g (float[1,{cin},{H},{W_}] x) => (float[1,{cout},{hw},{hw}] y)
<{", ".join(decl(nm, v) for nm, v in params.items())}>
{{
{body}
}}
""")


def check_folded(model: onnx.ModelProto, *, expect_applied: int, leftover: tuple[str, ...] = ("BatchNormalization",)):
    result = apply_pass(model, FoldBatchNorm())
    assert result.modified
    assert len(result.applied) == expect_applied
    hist = ops(result.model)
    for op in leftover:
        assert op not in hist, hist
    onnx.checker.check_model(result.model, full_check=True)
    assert_same_outputs(model, result.model)
    # The region's output keeps its name: the graph output is produced by the folded node.
    assert [o.name for o in result.model.graph.output] == [o.name for o in model.graph.output]
    return result


def assert_unchanged(model: onnx.ModelProto, result) -> None:
    assert not result.modified
    assert not result.applied
    expected = copy_model(model)
    normalize_model(expected)  # as loaded (an IR-3 model without initializer inputs becomes IR 4)
    assert result.model.SerializeToString() == name_nodes(expected).SerializeToString()


# ------------------------------------------------------------------------------------------------
# Pure math
# ------------------------------------------------------------------------------------------------


def test_batchnorm_scale_shift_matches_batchnorm() -> None:
    st = {k: v.astype(np.float64) for k, v in bn_stats(5).items()}
    eps = 1e-3
    s, t = batchnorm_scale_shift(st["gamma"], st["beta"], st["mean"], st["var"], eps)
    y = rng(7).standard_normal((2, 5, 3, 3))
    shape = (1, 5, 1, 1)
    direct = (y - st["mean"].reshape(shape)) / np.sqrt(st["var"].reshape(shape) + eps) * st["gamma"].reshape(shape) + st["beta"].reshape(shape)
    np.testing.assert_allclose(y * s.reshape(shape) + t.reshape(shape), direct, rtol=1e-12, atol=1e-12)
    assert s.dtype == np.float64 and t.dtype == np.float64


@pytest.mark.parametrize("with_bias", [True, False])
def test_fold_conv_per_output_channel(with_bias: bool) -> None:
    r = rng(0)
    w = r.standard_normal((6, 2, 3, 3)).astype(np.float32)
    b = r.standard_normal(6).astype(np.float32) if with_bias else None
    st = bn_stats(6)
    s, t = batchnorm_scale_shift(st["gamma"], st["beta"], st["mean"], st["var"], 1e-5)
    w2, b2 = fold_conv(w, b, s, t)
    for o in range(6):
        np.testing.assert_allclose(w2[o], w[o].astype(np.float64) * s[o], rtol=1e-12)
    b0 = b if b is not None else np.zeros(6)
    direct_b = (b0 - st["mean"]) / np.sqrt(st["var"].astype(np.float64) + 1e-5) * st["gamma"] + st["beta"]
    np.testing.assert_allclose(b2, direct_b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("group,cin,per_group", [(1, 4, 3), (2, 4, 3), (4, 4, 2)])
def test_fold_conv_transpose_group_layout(group: int, cin: int, per_group: int) -> None:
    r = rng(1)
    w = r.standard_normal((cin, per_group, 3, 2)).astype(np.float32)
    cout = per_group * group
    s = r.uniform(0.5, 2.0, cout)
    t = r.standard_normal(cout)
    w2, b2 = fold_conv_transpose(w, None, s, t, group)
    cin_g = cin // group
    for o in range(cout):
        g, j = divmod(o, per_group)
        rows = slice(g * cin_g, (g + 1) * cin_g)
        np.testing.assert_allclose(w2[rows, j], w[rows, j].astype(np.float64) * s[o], rtol=1e-12)
    np.testing.assert_allclose(b2, t)


@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("c_shape", [None, (), (1,), (4,), (1, 4)])
def test_fold_gemm_matches_direct(trans_b: bool, c_shape) -> None:
    r = rng(2)
    m, k, n, alpha, beta = 3, 5, 4, 0.7, 1.9
    a = r.standard_normal((m, k))
    b_mat = r.standard_normal((n, k) if trans_b else (k, n))
    c = None if c_shape is None else r.standard_normal(c_shape)
    s, t = r.uniform(0.5, 2.0, n), r.standard_normal(n)
    bb = b_mat.T if trans_b else b_mat
    direct = (alpha * a @ bb + (0 if c is None else beta * c)) * s + t
    b2, c2 = fold_gemm(b_mat, c, s, t, trans_b, beta)
    got = alpha * a @ (b2.T if trans_b else b2) + c2
    np.testing.assert_allclose(got, direct, rtol=1e-12, atol=1e-12)
    assert c2.shape == (n,)


def test_fold_gemm_mul_only_without_bias_adds_none() -> None:
    b2, c2 = fold_gemm(np.ones((2, 3)), None, np.array([1.0, 2.0, 3.0]), None, False, 1.0)
    np.testing.assert_array_equal(b2, [[1, 2, 3], [1, 2, 3]])
    assert c2 is None


def test_fold_bias() -> None:
    s, t = np.array([2.0, 3.0]), np.array([1.0, -1.0])
    assert fold_bias(None, s, None) is None
    np.testing.assert_array_equal(fold_bias(None, s, t), t)
    np.testing.assert_array_equal(fold_bias(np.array([1.0, 1.0]), s, None), s)
    np.testing.assert_array_equal(fold_bias(np.array([1.0, 2.0]), s, t), [3.0, 5.0])


@pytest.mark.parametrize(
    "shape,rank,ok",
    [
        ((), 4, True), ((1,), 4, True), ((1, 1, 1, 1), 4, True), ((5, 1, 1), 4, True), ((1, 5, 1, 1), 4, True),
        ((5,), 2, True), ((1, 5), 2, True), ((5, 1), 3, True),
        ((5,), 4, False), ((1, 1, 1, 7), 4, False), ((1, 5, 7, 7), 4, False), ((1, 1, 5, 1, 1), 4, False),
        ((3, 1, 1), 4, False), ((2, 5), 2, False), ((5, 1), 2, False),
    ],
)
def test_per_channel_vector(shape: tuple[int, ...], rank: int, ok: bool) -> None:
    value = rng(3).standard_normal(shape)
    got = per_channel_vector(value, rank, 5)
    if not ok:
        assert got is None
        return
    assert got is not None and got.shape == (5,)
    # Direct: broadcasting the constant against a rank-`rank` tensor equals scaling axis 1 by the vector.
    y = rng(4).standard_normal((2, 5) + (3,) * (rank - 2))
    per = got.reshape((1, 5) + (1,) * (rank - 2))
    np.testing.assert_allclose(y * value, y * per)


# ------------------------------------------------------------------------------------------------
# The pass on Conv / ConvTranspose / Gemm + BatchNormalization
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["Conv", "ConvTranspose"])
@pytest.mark.parametrize("opset", [9, 13, 17])
@pytest.mark.parametrize("groups", list(GROUPS))
@pytest.mark.parametrize("k,stride,pad", GEOMETRY)
@pytest.mark.parametrize("bias", [True, False])
def test_fold_conv_bn(op: str, opset: int, groups: str, k: int, stride: int, pad: int, bias: bool) -> None:
    model = conv_bn_model(op, opset=opset, groups=groups, k=k, stride=stride, pad=pad, bias=bias)
    result = check_folded(model, expect_applied=1)
    assert ops(result.model) == {op: 1}
    (cand,) = result.applied
    assert cand.nodes == (f"{op}_0", "BatchNormalization_1")
    node = result.model.graph.node[0]
    assert node.op_type == op and list(node.output) == ["y"] and len(node.input) == 3


@pytest.mark.parametrize("op", ["Conv", "ConvTranspose"])
@pytest.mark.parametrize("opset", [9, 17])
def test_fold_conv_bn_weights_in_constant_nodes(op: str, opset: int) -> None:
    model = conv_bn_model(op, opset=opset, groups="g2", constants=True)
    assert ops(model)["Constant"] == 6  # W, b and the four BN inputs
    result = check_folded(model, expect_applied=1)
    assert ops(result.model) == {op: 1}  # the dead Constant nodes are gone


GEMM_CASES = [
    (opset, trans_a, trans_b, bias, alpha, beta)
    for opset, trans_a, trans_b, bias, (alpha, beta) in itertools.product(
        [9, 13, 17], [0, 1], [0, 1], ["none", "n", "1n", "1"], [(1.0, 1.0), (0.5, 2.5)]
    )
    if not (opset < 11 and bias == "none")  # Gemm's C is required before opset 11
]


@pytest.mark.parametrize("opset,trans_a,trans_b,bias,alpha,beta", GEMM_CASES)
def test_fold_gemm_bn(opset: int, trans_a: int, trans_b: int, bias: str, alpha: float, beta: float) -> None:
    model = gemm_bn_model(opset=opset, trans_a=trans_a, trans_b=trans_b, bias=bias, alpha=alpha, beta=beta)
    result = check_folded(model, expect_applied=1)
    assert ops(result.model) == {"Gemm": 1}
    gemm = result.model.graph.node[0]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gemm.attribute}
    assert attrs["beta"] == 1.0 and attrs["alpha"] == pytest.approx(alpha)


def test_nodes_order_output_name_and_cost() -> None:
    model = conv_bn_model("Conv", groups="g2")
    m = Model.from_source(model)
    (cand,) = list(FoldBatchNorm().find(m))
    assert isinstance(cand, Candidate)
    assert cand.nodes == ("Conv_0", "BatchNormalization_1")  # (producer, follower), named by name_nodes
    assert cand.pass_name == "fold_batchnorm"
    cin, cout, group = GROUPS["g2"]
    w = cout * (cin // group) * 9
    assert cand.cost.macs_before == cand.cost.macs_after > 0
    assert cand.cost.params_before == w + cout + 4 * cout
    assert cand.cost.params_after == w + cout


def test_shared_weights_fold_into_new_initializers() -> None:
    """Two convs share one weight initializer, each followed by its own BN: both fold, into new weights."""
    cin, cout = 3, 4
    w = rng(5).standard_normal((cout, cin, 3, 3)).astype(np.float32)
    s1, s2 = bn_stats(cout, 1), bn_stats(cout, 2)
    inits = [decl("W", w)] + [decl(f"{k}1", v) for k, v in s1.items()] + [decl(f"{k}2", v) for k, v in s2.items()]
    model = parse(f"""
{header(17)}
g (float[1,{cin},6,6] x) => (float[1,{cout},6,6] y1, float[1,{cout},6,6] y2)
<{", ".join(inits)}>
{{
  a = Conv <pads = [1,1,1,1]> (x, W)
  b = Conv <pads = [1,1,1,1]> (x, W)
  y1 = BatchNormalization (a, gamma1, beta1, mean1, var1)
  y2 = BatchNormalization (b, gamma2, beta2, mean2, var2)
}}
""")
    original_w = onnx.numpy_helper.to_array(model.graph.initializer[0]).copy()
    result = check_folded(model, expect_applied=2)
    assert ops(result.model) == {"Conv": 2}
    weights = {n.input[1] for n in result.model.graph.node}
    assert len(weights) == 2 and "W" not in weights
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(model.graph.initializer[0]), original_w)


def test_mul_then_add_chain_folds_in_two_rounds() -> None:
    cin, cout, _ = GROUPS["g2"]
    model = conv_affine_model([("Mul", (cout, 1, 1), False), ("Add", (1, cout, 1, 1), True)], bias=False)
    result = check_folded(model, expect_applied=2, leftover=("Mul", "Add"))
    assert ops(result.model) == {"Conv": 1}


def test_bn_then_mul_chain() -> None:
    cin, cout = 3, 4
    w = rng(5).standard_normal((cout, cin, 1, 1)).astype(np.float32)
    k = rng(6).uniform(0.5, 2, (cout, 1, 1)).astype(np.float32)
    inits = [decl("W", w), decl("k", k)] + [decl(n, v) for n, v in bn_stats(cout).items()]
    model = parse(f"""
{header(13)}
g (float[1,{cin},5,5] x) => (float[1,{cout},5,5] y)
<{", ".join(inits)}>
{{
  a = Conv (x, W)
  n = BatchNormalization (a, gamma, beta, mean, var)
  y = Mul (n, k)
}}
""")
    result = check_folded(model, expect_applied=2, leftover=("BatchNormalization", "Mul"))
    assert ops(result.model) == {"Conv": 1}


# ------------------------------------------------------------------------------------------------
# Standalone per-channel Mul / Add
# ------------------------------------------------------------------------------------------------

C_OUT = GROUPS["g2"][1]


@pytest.mark.parametrize("op", ["Conv", "ConvTranspose"])
@pytest.mark.parametrize("kind", ["Mul", "Add"])
@pytest.mark.parametrize("shape", [(C_OUT, 1, 1), (1, C_OUT, 1, 1), (), (1,)])
@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("opset", [9, 17])
def test_fold_affine(op: str, kind: str, shape: tuple[int, ...], swap: bool, bias: bool, opset: int) -> None:
    model = conv_affine_model([(kind, shape, swap)], op=op, bias=bias, opset=opset)
    result = check_folded(model, expect_applied=1, leftover=(kind,))
    assert ops(result.model) == {op: 1}
    folded = result.model.graph.node[0]
    # A Mul on a bias-free conv adds no bias; everything else carries one.
    assert len(folded.input) == (2 if kind == "Mul" and not bias else 3)


@pytest.mark.parametrize("kind", ["Mul", "Add"])
@pytest.mark.parametrize("shape", [(4,), (1, 4)])
def test_fold_affine_after_gemm(kind: str, shape: tuple[int, ...]) -> None:
    b_mat = rng(0).standard_normal((5, 4)).astype(np.float32)
    k = rng(1).uniform(0.5, 2.0, shape).astype(np.float32)
    model = parse(f"""
{header(13)}
g (float[3,5] x) => (float[3,4] y)
<{decl("B", b_mat)}, {decl("k", k)}>
{{
  c = Gemm <alpha = 0.5> (x, B)
  y = {kind} (c, k)
}}
""")
    result = check_folded(model, expect_applied=1, leftover=(kind,))
    assert ops(result.model) == {"Gemm": 1}


# ------------------------------------------------------------------------------------------------
# Skips: the model is left unchanged and the reason is recorded
# ------------------------------------------------------------------------------------------------


def skip_reasons(result) -> list[str]:
    return [s.reason for s in result.skipped]


def test_skip_bn_stats_graph_input() -> None:
    cin, cout = 3, 4
    w = rng(5).standard_normal((cout, cin, 1, 1)).astype(np.float32)
    st = bn_stats(cout)
    model = parse(f"""
{header(13)}
g (float[1,{cin},5,5] x, float[{cout}] mean) => (float[1,{cout},5,5] y)
<{decl("W", w)}, {decl("gamma", st["gamma"])}, {decl("beta", st["beta"])}, {decl("var", st["var"])}>
{{
  a = Conv (x, W)
  y = BatchNormalization (a, gamma, beta, mean, var)
}}
""")
    result = apply_pass(model, FoldBatchNorm())
    assert_unchanged(model, result)
    (reason,) = skip_reasons(result)
    assert "'mean' is a graph input" in reason


def test_fold_ir3_opset8_model() -> None:
    """IR 3 lists every initializer as a graph input: they are constants, and the folded model lists its new ones."""
    model = conv_bn_model("Conv", opset=9, groups="g2")
    model.opset_import[0].version = 8  # BatchNormalization-7, with its spatial attribute
    model.ir_version = 3
    for t in model.graph.initializer:
        model.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, t.dims))
    onnx.checker.check_model(model, full_check=True)
    result = check_folded(model, expect_applied=1)
    assert ops(result.model) == {"Conv": 1}
    assert {t.name for t in result.model.graph.initializer} <= {i.name for i in result.model.graph.input}


def test_skip_conv_output_is_graph_output() -> None:
    cin, cout = 3, 4
    w = rng(5).standard_normal((cout, cin, 1, 1)).astype(np.float32)
    inits = [decl("W", w)] + [decl(n, v) for n, v in bn_stats(cout).items()]
    model = parse(f"""
{header(13)}
g (float[1,{cin},5,5] x) => (float[1,{cout},5,5] y, float[1,{cout},5,5] a)
<{", ".join(inits)}>
{{
  a = Conv (x, W)
  y = BatchNormalization (a, gamma, beta, mean, var)
}}
""")
    result = apply_pass(model, FoldBatchNorm())
    assert_unchanged(model, result)
    (reason,) = skip_reasons(result)
    assert reason == "intermediate tensor 'a' is a graph output"


def test_skip_conv_output_two_consumers() -> None:
    cin, cout = 3, 4
    w = rng(5).standard_normal((cout, cin, 1, 1)).astype(np.float32)
    inits = [decl("W", w)] + [decl(n, v) for n, v in bn_stats(cout).items()]
    model = parse(f"""
{header(13)}
g (float[1,{cin},5,5] x) => (float[1,{cout},5,5] y, float[1,{cout},5,5] z)
<{", ".join(inits)}>
{{
  a = Conv (x, W)
  y = BatchNormalization (a, gamma, beta, mean, var)
  z = Relu (a)
}}
""")
    result = apply_pass(model, FoldBatchNorm())
    assert_unchanged(model, result)
    (reason,) = skip_reasons(result)
    assert reason == "intermediate tensor 'a' has 2 consumers"


def test_skip_conv_weight_graph_input() -> None:
    cin, cout = 3, 4
    inits = [decl(n, v) for n, v in bn_stats(cout).items()]
    model = parse(f"""
{header(13)}
g (float[1,{cin},5,5] x, float[{cout},{cin},1,1] W) => (float[1,{cout},5,5] y)
<{", ".join(inits)}>
{{
  a = Conv (x, W)
  y = BatchNormalization (a, gamma, beta, mean, var)
}}
""")
    result = apply_pass(model, FoldBatchNorm())
    assert_unchanged(model, result)
    (reason,) = skip_reasons(result)
    assert "'W' is a graph input" in reason


def test_skip_training_mode() -> None:
    model = conv_bn_model("Conv", opset=17)
    for node in model.graph.node:
        if node.op_type == "BatchNormalization":
            node.attribute.append(onnx.helper.make_attribute("training_mode", 1))
    result = apply_pass(model, FoldBatchNorm())
    assert_unchanged(model, result)
    assert any("training_mode" in r for r in skip_reasons(result))


def test_skip_spatial_zero() -> None:
    model = conv_bn_model("Conv", opset=9)
    model.opset_import[0].version = 7
    model.ir_version = 3
    for node in model.graph.node:
        if node.op_type == "BatchNormalization":
            node.attribute.append(onnx.helper.make_attribute("spatial", 0))
    result = apply_pass(model, FoldBatchNorm())
    assert_unchanged(model, result)
    assert any("spatial=0" in r for r in skip_reasons(result))


@pytest.mark.parametrize("shape", [(1, 1, 1, 7), (1, C_OUT, 7, 7), (7,), (1, 1, 7, 1), (C_OUT, 7, 1)])
def test_skip_affine_other_broadcast(shape: tuple[int, ...]) -> None:
    model = conv_affine_model([("Mul", shape, False)])
    result = apply_pass(model, FoldBatchNorm())
    assert_unchanged(model, result)
    (reason,) = skip_reasons(result)
    assert "does not broadcast per channel" in reason


@pytest.mark.parametrize("kind", ["Add", "Mul"])
@pytest.mark.parametrize("other", ["x", "k"])
def test_affine_with_runtime_operand_is_not_a_match(kind: str, other: str) -> None:
    """Conv then Add/Mul with run-time data (a residual, or a graph input) is no affine map: no candidate, no skip."""
    w = rng(5).standard_normal((3, 3, 1, 1)).astype(np.float32)
    model = parse(f"""
{header(13)}
g (float[1,3,5,5] x, float[3,1,1] k) => (float[1,3,5,5] y)
<{decl("W", w)}>
{{
  a = Conv (x, W)
  y = {kind} (a, {other})
}}
""")
    result = apply_pass(model, FoldBatchNorm())
    assert_unchanged(model, result)
    assert result.skipped == []


def test_skip_gemm_bias_per_row() -> None:
    b_mat = rng(0).standard_normal((5, 4)).astype(np.float32)
    c = rng(1).standard_normal((3, 1)).astype(np.float32)
    inits = [decl("B", b_mat), decl("C", c)] + [decl(n, v) for n, v in bn_stats(4).items()]
    model = parse(f"""
{header(13)}
g (float[3,5] x) => (float[3,4] y)
<{", ".join(inits)}>
{{
  g1 = Gemm (x, B, C)
  y = BatchNormalization (g1, gamma, beta, mean, var)
}}
""")
    result = apply_pass(model, FoldBatchNorm())
    assert_unchanged(model, result)
    (reason,) = skip_reasons(result)
    assert "bias C of shape (3, 1) is not per column" in reason


def test_stale_candidate_raises() -> None:
    model = Model.from_source(conv_bn_model("Conv"))
    p = FoldBatchNorm()
    (cand,) = list(p.find(model))
    fork = model.fork()
    p.apply(fork, cand)
    committed = fork.commit()
    with pytest.raises(RewriteError):
        p.apply(committed.fork(), cand)

