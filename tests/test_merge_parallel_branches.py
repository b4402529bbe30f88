"""merge_parallel_branches: weight math alone, then the pass on tiny ONNX-text graphs against onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from passes.branch_kernels import align_branches, concat_branches, identity_kernel, merge_branches, pad_kernel_to
from passes.merge_parallel_branches import MergeParallelBranches
from rewriter.model import Model
from rewriter.pipeline import apply_pass
from tests.helpers import assert_same_outputs, ops, parse

# -- weight math -------------------------------------------------------------------------------------


def conv2d(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None, *, stride: int = 1,
           pads: tuple[int, int, int, int] = (0, 0, 0, 0), group: int = 1) -> np.ndarray:
    """Direct NCHW convolution (cross-correlation, as ONNX Conv), float64; the test's reference."""
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    xp = np.zeros((n, c, h + pads[0] + pads[2], wd + pads[1] + pads[3]))
    xp[:, :, pads[0]:pads[0] + h, pads[1]:pads[1] + wd] = x
    ho = (xp.shape[2] - kh) // stride + 1
    wo = (xp.shape[3] - kw) // stride + 1
    out = np.zeros((n, o, ho, wo))
    og = o // group
    for g in range(group):
        xs = xp[:, g * cg:(g + 1) * cg]
        ws = w[g * og:(g + 1) * og]
        for i in range(kh):
            for j in range(kw):
                patch = xs[:, :, i:i + stride * ho:stride, j:j + stride * wo:stride]  # [n, cg, ho, wo]
                out[:, g * og:(g + 1) * og] += np.einsum("nchw,oc->nohw", patch, ws[:, :, i, j])
    if b is not None:
        out += b.reshape(1, -1, 1, 1)
    return out


def test_pad_kernel_to_centres_and_copies() -> None:
    w = np.arange(6, dtype=np.float32).reshape(2, 3, 1, 1)
    before = w.copy()
    p = pad_kernel_to(w, (3, 3))
    assert p.shape == (2, 3, 3, 3) and p.dtype == w.dtype
    np.testing.assert_array_equal(p[:, :, 1, 1], w[:, :, 0, 0])
    assert np.count_nonzero(p) == np.count_nonzero(w)
    np.testing.assert_array_equal(w, before)
    q = pad_kernel_to(np.ones((1, 1, 1, 3)), (5, 5), (4, 0))
    np.testing.assert_array_equal(q[0, 0, 4, :3], 1)
    assert q.sum() == 3


def test_pad_kernel_to_rejects_what_does_not_fit() -> None:
    with pytest.raises(ValueError):
        pad_kernel_to(np.ones((1, 1, 3, 3)), (3, 3), (1, 0))
    with pytest.raises(ValueError):
        pad_kernel_to(np.ones((1, 1, 5, 5)), (3, 3))


@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_identity_kernel_is_the_identity(group: int, k: int) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 6, 6))
    w = identity_kernel(4, group, (k, k))
    assert w.shape == (4, 4 // group, k, k)
    np.testing.assert_allclose(conv2d(x, w, pads=(k // 2,) * 4, group=group), x, rtol=0, atol=0)
    scale = np.array([1.0, 2.0, -3.0, 0.5])
    ws = identity_kernel(4, group, (k, k), scale=scale)
    np.testing.assert_allclose(conv2d(x, ws, pads=(k // 2,) * 4, group=group), x * scale.reshape(1, 4, 1, 1), atol=1e-12)


def test_identity_kernel_rejects_bad_groups() -> None:
    with pytest.raises(ValueError):
        identity_kernel(6, 4, (3, 3))


@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("k", [3, 5])
def test_merge_branches_equals_the_sum_of_convs(group: int, stride: int, k: int) -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 4, 9, 9))
    wk, bk = rng.standard_normal((4, 4 // group, k, k)), rng.standard_normal(4)
    w1, b1 = rng.standard_normal((4, 4 // group, 1, 1)), rng.standard_normal(4)
    want = conv2d(x, wk, bk, stride=stride, pads=(k // 2,) * 4, group=group) + conv2d(x, w1, b1, stride=stride, group=group)
    branches = [(wk, bk), (w1, b1)]
    if stride == 1:
        branches.append((identity_kernel(4, group, (1, 1)), None))
        want = want + x
    w, b = merge_branches(branches, (k, k))
    np.testing.assert_allclose(conv2d(x, w, b, stride=stride, pads=(k // 2,) * 4, group=group), want, rtol=1e-10, atol=1e-10)


def test_merge_branches_asymmetric_acnet() -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 3, 7, 7))
    w33, w13, w31 = (rng.standard_normal((5, 3) + s) for s in [(3, 3), (1, 3), (3, 1)])
    kernel, pads, offsets = align_branches([(3, 3), (1, 3), (3, 1)], [(1, 1, 1, 1), (0, 1, 0, 1), (1, 0, 1, 0)])
    assert kernel == (3, 3) and pads == (1, 1, 1, 1) and offsets == ((0, 0), (1, 0), (0, 1))
    w, b = merge_branches([(w33, None), (w13, None), (w31, None)], kernel, offsets)
    assert b is None
    want = conv2d(x, w33, pads=(1, 1, 1, 1)) + conv2d(x, w13, pads=(0, 1, 0, 1)) + conv2d(x, w31, pads=(1, 0, 1, 0))
    np.testing.assert_allclose(conv2d(x, w, pads=pads), want, rtol=1e-10, atol=1e-10)


def test_merge_branches_bias_and_dtype() -> None:
    w = np.ones((2, 1, 1, 1), dtype=np.float32)
    _, b = merge_branches([(w, None), (w, np.array([1.0, 2.0], dtype=np.float32)), (w, np.array([3.0, 4.0]))], (1, 1))
    np.testing.assert_array_equal(b, [4.0, 6.0])
    assert b.dtype == np.float64
    with pytest.raises(ValueError):
        merge_branches([(np.ones((2, 1, 1, 1)), None), (np.ones((3, 1, 1, 1)), None)], (1, 1))


def test_align_branches_off_centre_and_misaligned() -> None:
    # a 3x3 window anchored at the top-left corner of a 5x5 one
    kernel, pads, offsets = align_branches([(5, 5), (3, 3)], [(2, 2, 2, 2), (0, 0, 2, 2)])
    assert kernel == (5, 5) and pads == (2, 2, 2, 2) and offsets == ((0, 0), (2, 2))
    with pytest.raises(ValueError, match="shifted"):
        align_branches([(3, 3), (3, 3)], [(1, 1, 1, 1), (0, 0, 2, 2)])
    with pytest.raises(ValueError, match="output size"):
        align_branches([(3, 3), (1, 1)], [(1, 1, 1, 1), (1, 1, 1, 1)])


def test_concat_branches_fills_missing_bias() -> None:
    w1, w2 = np.ones((2, 3, 1, 1)), 2 * np.ones((4, 3, 1, 1))
    w, b = concat_branches([(w1, None), (w2, np.arange(4.0))])
    assert w.shape == (6, 3, 1, 1)
    np.testing.assert_array_equal(b, [0, 0, 0, 1, 2, 3])
    assert concat_branches([(w1, None), (w2, None)])[1] is None


# -- the pass on ONNX-text models --------------------------------------------------------------------


def out_size(h: int, k: int, pad: int, stride: int) -> int:
    return (h + 2 * pad - k) // stride + 1


def repvgg_text(*, k: int = 3, group: int = 1, stride: int = 1, bias: bool = True, identity: bool = True,
                opset: int = 17, c_out: int = 4, h: int = 7, nested_right: bool = False) -> str:
    """``Y = conv_kxk(X) + conv_1x1(X) [+ X]`` as ONNX text."""
    c_in = 4
    ho = out_size(h, k, k // 2, stride)
    decl = [f"float[{c_out}, {c_in // group}, {k}, {k}] Wk", f"float[{c_out}, {c_in // group}, 1, 1] W1"]
    bk, b1 = "", ""
    if bias:
        decl += [f"float[{c_out}] Bk", f"float[{c_out}] B1"]
        bk, b1 = ", Bk", ", B1"
    common = f"strides = [{stride}, {stride}], group = {group}"
    body = [
        f"A = Conv <kernel_shape = [{k}, {k}], pads = [{k // 2}, {k // 2}, {k // 2}, {k // 2}], {common}> (X, Wk{bk})",
        f"B = Conv <kernel_shape = [1, 1], pads = [0, 0, 0, 0], {common}> (X, W1{b1})",
    ]
    if not identity:
        body.append("Y = Add (A, B)")
    elif nested_right:
        body += ["S = Add (B, X)", "Y = Add (A, S)"]
    else:
        body += ["S = Add (A, B)", "Y = Add (S, X)"]
    lines = "\n            ".join(body)
    return f"""
        <ir_version: 8, opset_import: ["" : {opset}]>
        g (float[1, {c_in}, {h}, {h}] X) => (float[1, {c_out}, {ho}, {ho}] Y)
        <{", ".join(decl)}> {{
            {lines}
        }}
    """


def conv_attrs(model: onnx.ModelProto, node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


CASES = [
    (k, group, stride, bias, identity, opset)
    for k in (3, 5)
    for group in (1, 2)
    for stride in (1, 2)
    for bias in (True, False)
    for identity in (True, False)
    for opset in (13, 17)
    if not (identity and stride != 1)
]


@pytest.mark.parametrize("k,group,stride,bias,identity,opset", CASES)
def test_merges_repvgg_block(k: int, group: int, stride: int, bias: bool, identity: bool, opset: int) -> None:
    model = parse(repvgg_text(k=k, group=group, stride=stride, bias=bias, identity=identity, opset=opset,
                              c_out=4 if identity else 6))
    result = apply_pass(model, MergeParallelBranches())
    assert result.modified and len(result.applied) == 1
    assert ops(result.model) == {"Conv": 1}
    onnx.checker.check_model(result.model, full_check=True)
    assert_same_outputs(model, result.model)
    conv = result.model.graph.node[0]
    attrs = conv_attrs(result.model, conv)
    assert attrs["kernel_shape"] == [k, k] and attrs["strides"] == [stride, stride] and attrs["group"] == group
    assert attrs["pads"] == [k // 2] * 4
    assert list(conv.output) == ["Y"] and conv.input[0] == "X"
    assert (len(conv.input) == 3) == bias
    cand = result.applied[0]
    assert len(cand.nodes) == (4 if identity else 3)  # both convs and every Add
    assert cand.cost.macs_after < cand.cost.macs_before


def test_candidate_nodes_are_in_graph_order() -> None:
    model = Model.from_source(parse(repvgg_text()))
    (cand,) = list(MergeParallelBranches().find(model))
    order = [n.name for n in model.proto.graph.node]
    assert list(cand.nodes) == order  # every node of the block is replaced
    assert "3x3 + 1x1 + identity" in cand.description


def test_nested_add_on_the_right_is_one_candidate() -> None:
    model = parse(repvgg_text(nested_right=True))
    found = list(MergeParallelBranches().find(Model.from_source(model)))
    assert len(found) == 1
    result = apply_pass(model, MergeParallelBranches())
    assert ops(result.model) == {"Conv": 1}
    assert_same_outputs(model, result.model)


def test_balanced_add_tree_with_two_kernels_and_identity() -> None:
    model = parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 4, 8, 8] X) => (float[1, 4, 8, 8] Y)
        <float[4, 4, 5, 5] W5, float[4] B5, float[4, 4, 3, 3] W3, float[4, 4, 1, 1] W1, float[4] B1> {
            A = Conv <kernel_shape = [5, 5], pads = [2, 2, 2, 2]> (X, W5, B5)
            B = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (X, W3)
            C = Conv <kernel_shape = [1, 1]> (X, W1, B1)
            S = Add (A, B)
            T = Add (C, X)
            Y = Add (S, T)
        }
    """)
    result = apply_pass(model, MergeParallelBranches())
    assert ops(result.model) == {"Conv": 1}
    assert len(result.applied) == 1
    assert_same_outputs(model, result.model)


@pytest.mark.parametrize("identity", [True, False])
def test_merges_acnet_asymmetric_branches(identity: bool) -> None:
    extra = "\n            Y = Add (S2, X)" if identity else "\n            Y = Identity (S2)"
    model = parse(f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 4, 6, 6] X) => (float[1, 4, 6, 6] Y)
        <float[4, 4, 3, 3] W33, float[4] B33, float[4, 4, 1, 3] W13, float[4] B13, float[4, 4, 3, 1] W31, float[4] B31> {{
            A = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (X, W33, B33)
            B = Conv <kernel_shape = [1, 3], pads = [0, 1, 0, 1]> (X, W13, B13)
            C = Conv <kernel_shape = [3, 1], pads = [1, 0, 1, 0]> (X, W31, B31)
            S1 = Add (A, B)
            S2 = Add (S1, C){extra}
        }}
    """)
    result = apply_pass(model, MergeParallelBranches())
    assert ops(result.model) == ({"Conv": 1} if identity else {"Conv": 1, "Identity": 1})
    onnx.checker.check_model(result.model, full_check=True)
    assert_same_outputs(model, result.model)


def test_merges_batchnorm_on_the_identity_branch() -> None:
    """RepVGG proper: the identity branch is BatchNormalization(X)."""
    model = parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 4, 6, 6] X) => (float[1, 4, 6, 6] Y)
        <float[4, 2, 3, 3] W3, float[4, 2, 1, 1] W1, float[4] B1, float[4] gamma, float[4] beta, float[4] mean, float[4] var> {
            A = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1], group = 2> (X, W3)
            B = Conv <kernel_shape = [1, 1], group = 2> (X, W1, B1)
            N = BatchNormalization <epsilon = 0.001> (X, gamma, beta, mean, var)
            S = Add (A, B)
            T = Add (S, N)
            Y = Relu (T)
        }
    """)
    result = apply_pass(model, MergeParallelBranches())
    assert ops(result.model) == {"Conv": 1, "Relu": 1}
    assert_same_outputs(model, result.model)


def test_conv_plus_identity_keeps_macs_and_drops_the_add() -> None:
    model = parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 4, 6, 6] X) => (float[1, 4, 6, 6] Y)
        <float[4, 4, 3, 3] W3> {
            A = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (X, W3)
            Y = Add (X, A)
        }
    """)
    result = apply_pass(model, MergeParallelBranches())
    assert ops(result.model) == {"Conv": 1}
    assert result.applied[0].cost.macs_saved == 0
    assert_same_outputs(model, result.model)


def test_partial_tree_merges_the_inner_add_only() -> None:
    model = parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 4, 6, 6] X, float[1, 4, 6, 6] R) => (float[1, 4, 6, 6] Y)
        <float[4, 4, 3, 3] W3, float[4, 4, 1, 1] W1> {
            A = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (X, W3)
            B = Conv <kernel_shape = [1, 1]> (X, W1)
            S = Add (A, B)
            Y = Add (S, R)
        }
    """)
    result = apply_pass(model, MergeParallelBranches())
    assert ops(result.model) == {"Add": 1, "Conv": 1}
    assert_same_outputs(model, result.model)


def test_residual_add_on_another_tensor_is_not_matched() -> None:
    model = parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 4, 6, 6] X, float[1, 4, 6, 6] R) => (float[1, 4, 6, 6] Y)
        <float[4, 4, 3, 3] W3> {
            A = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (X, W3)
            Y = Add (A, R)
        }
    """)
    result = apply_pass(model, MergeParallelBranches())
    assert not result.modified and result.skipped == []


# -- skips -------------------------------------------------------------------------------------------


def skip_reasons(model: onnx.ModelProto, **options: bool) -> list[str]:
    result = apply_pass(model, MergeParallelBranches(**options))
    assert not result.modified
    assert ops(result.model) == ops(model)
    return [s.reason for s in result.skipped]


def test_skips_misaligned_padding() -> None:
    model = parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 4, 6, 6] X) => (float[1, 4, 6, 6] Y)
        <float[4, 4, 3, 3] Wa, float[4, 4, 3, 3] Wb> {
            A = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (X, Wa)
            B = Conv <kernel_shape = [3, 3], pads = [0, 0, 2, 2]> (X, Wb)
            Y = Add (A, B)
        }
    """)
    assert any("misaligned" in r for r in skip_reasons(model))


def test_skips_different_strides() -> None:
    # On a 5x5 input a 3x3 stride-1 unpadded conv and a 1x1 stride-2 conv both give 3x3 outputs.
    model = parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 4, 5, 5] X) => (float[1, 4, 3, 3] Y)
        <float[4, 4, 3, 3] Wa, float[4, 4, 1, 1] Wb> {
            A = Conv <kernel_shape = [3, 3]> (X, Wa)
            B = Conv <kernel_shape = [1, 1], strides = [2, 2]> (X, Wb)
            Y = Add (A, B)
        }
    """)
    assert any("different strides" in r for r in skip_reasons(model))


def test_skips_branch_output_used_elsewhere() -> None:
    model = parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 4, 6, 6] X) => (float[1, 4, 6, 6] Y, float[1, 4, 6, 6] Z)
        <float[4, 4, 3, 3] Wa, float[4, 4, 1, 1] Wb> {
            A = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (X, Wa)
            B = Conv <kernel_shape = [1, 1]> (X, Wb)
            Y = Add (A, B)
            Z = Relu (B)
        }
    """)
    assert any("used elsewhere" in r for r in skip_reasons(model))


def test_skips_branch_output_that_is_a_graph_output() -> None:
    model = parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 4, 6, 6] X) => (float[1, 4, 6, 6] Y, float[1, 4, 6, 6] B)
        <float[4, 4, 3, 3] Wa, float[4, 4, 1, 1] Wb> {
            A = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (X, Wa)
            B = Conv <kernel_shape = [1, 1]> (X, Wb)
            Y = Add (A, B)
        }
    """)
    assert any("graph output" in r for r in skip_reasons(model))


def test_skips_identity_next_to_a_strided_conv() -> None:
    # A stride-2 conv keeps a 1x1 input 1x1, so the Add type-checks, but the identity cannot join a stride-2 conv.
    model = parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 4, 1, 1] X) => (float[1, 4, 1, 1] Y)
        <float[4, 4, 3, 3] Wa> {
            A = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1], strides = [2, 2]> (X, Wa)
            Y = Add (A, X)
        }
    """)
    assert any("stride 1" in r for r in skip_reasons(model))


def test_skips_weight_graph_input_and_dilation() -> None:
    model = parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 4, 6, 6] X, float[4, 4, 1, 1] Wb) => (float[1, 4, 6, 6] Y)
        <float[4, 4, 3, 3] Wa> {
            A = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (X, Wa)
            B = Conv <kernel_shape = [1, 1]> (X, Wb)
            Y = Add (A, B)
        }
    """)
    assert any("graph input" in r for r in skip_reasons(model))
    dilated = parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 4, 6, 6] X) => (float[1, 4, 6, 6] Y)
        <float[4, 4, 3, 3] Wa, float[4, 4, 1, 1] Wb> {
            A = Conv <kernel_shape = [3, 3], pads = [2, 2, 2, 2], dilations = [2, 2]> (X, Wa)
            B = Conv <kernel_shape = [1, 1]> (X, Wb)
            Y = Add (A, B)
        }
    """)
    assert any("dilations" in r for r in skip_reasons(dilated))


def test_skips_when_macs_would_rise() -> None:
    # 1x3 + 3x1 alone would become a 3x3: 6 -> 9 taps.
    model = parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 4, 6, 6] X) => (float[1, 4, 6, 6] Y)
        <float[4, 4, 1, 3] Wa, float[4, 4, 3, 1] Wb> {
            A = Conv <kernel_shape = [1, 3], pads = [0, 1, 0, 1]> (X, Wa)
            B = Conv <kernel_shape = [3, 1], pads = [1, 0, 1, 0]> (X, Wb)
            Y = Add (A, B)
        }
    """)
    assert any("raise MACs" in r for r in skip_reasons(model))


# -- concat and split --------------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [1, -3])
@pytest.mark.parametrize("biases", [(True, True, True), (True, False, True), (False, False, False)])
@pytest.mark.parametrize("k,stride", [(1, 1), (3, 2)])
def test_merges_concatenated_convs(axis: int, biases: tuple[bool, bool, bool], k: int, stride: int) -> None:
    pad = k // 2
    ho = out_size(7, k, pad, stride)
    decl, convs = [], []
    for i, (c, has_b) in enumerate(zip((2, 3, 5), biases)):
        decl.append(f"float[{c}, 4, {k}, {k}] W{i}")
        args = f"X, W{i}"
        if has_b:
            decl.append(f"float[{c}] B{i}")
            args += f", B{i}"
        convs.append(f"C{i} = Conv <kernel_shape = [{k}, {k}], pads = [{pad}, {pad}, {pad}, {pad}], strides = [{stride}, {stride}]> ({args})")
    body = "\n            ".join(convs)
    model = parse(f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 4, 7, 7] X) => (float[1, 10, {ho}, {ho}] Y)
        <{", ".join(decl)}> {{
            {body}
            Y = Concat <axis = {axis}> (C0, C1, C2)
        }}
    """)
    result = apply_pass(model, MergeParallelBranches())
    assert ops(result.model) == {"Conv": 1}
    assert list(result.model.graph.node[0].output) == ["Y"]
    onnx.checker.check_model(result.model, full_check=True)
    assert_same_outputs(model, result.model)
    assert result.applied[0].cost.macs_saved == 0


def test_merges_a_run_inside_a_concat() -> None:
    model = parse("""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[1, 4, 6, 6] X, float[1, 3, 6, 6] R) => (float[1, 12, 6, 6] Y)
        <float[2, 4, 1, 1] Wa, float[4, 4, 1, 1] Wb, float[3, 4, 3, 3] Wc> {
            A = Conv <kernel_shape = [1, 1]> (X, Wa)
            B = Conv <kernel_shape = [1, 1]> (X, Wb)
            C = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (X, Wc)
            Y = Concat <axis = 1> (R, A, B, C)
        }
    """)
    result = apply_pass(model, MergeParallelBranches())
    assert ops(result.model) == {"Conv": 2, "Concat": 1}
    assert result.model.graph.output[0].name == "Y"
    onnx.checker.check_model(result.model, full_check=True)
    assert_same_outputs(model, result.model)


def test_two_runs_in_one_concat_reach_a_fixed_point() -> None:
    model = parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 4, 6, 6] X, float[1, 4, 6, 6] V, float[1, 3, 6, 6] R) => (float[1, 15, 6, 6] Y)
        <float[2, 4, 1, 1] Wa, float[4, 4, 1, 1] Wb, float[3, 4, 3, 3] Wc, float[3, 4, 3, 3] Wd, float[3] Bd> {
            A = Conv <kernel_shape = [1, 1]> (X, Wa)
            B = Conv <kernel_shape = [1, 1]> (X, Wb)
            C = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (V, Wc)
            D = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (V, Wd, Bd)
            Y = Concat <axis = 1> (A, B, R, C, D)
        }
    """)
    result = apply_pass(model, MergeParallelBranches())
    assert len(result.applied) == 2
    assert ops(result.model) == {"Conv": 2, "Concat": 1}
    onnx.checker.check_model(result.model, full_check=True)
    assert_same_outputs(model, result.model)


def test_skips_concat_branch_used_elsewhere() -> None:
    model = parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 4, 6, 6] X) => (float[1, 8, 6, 6] Y, float[1, 4, 6, 6] Z)
        <float[4, 4, 1, 1] Wa, float[4, 4, 1, 1] Wb> {
            A = Conv <kernel_shape = [1, 1]> (X, Wa)
            B = Conv <kernel_shape = [1, 1]> (X, Wb)
            Y = Concat <axis = 1> (A, B)
            Z = Relu (B)
        }
    """)
    assert any("used elsewhere" in r for r in skip_reasons(model))


def test_skips_concat_along_another_axis() -> None:
    model = parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 4, 6, 6] X) => (float[1, 4, 12, 6] Y)
        <float[4, 4, 1, 1] Wa, float[4, 4, 1, 1] Wb> {
            A = Conv <kernel_shape = [1, 1]> (X, Wa)
            B = Conv <kernel_shape = [1, 1]> (X, Wb)
            Y = Concat <axis = 2> (A, B)
        }
    """)
    assert any("axis 2" in r for r in skip_reasons(model))


def split_text(opset: int, k: int = 1) -> str:
    pad = k // 2
    attrs = f"kernel_shape = [{k}, {k}], pads = [{pad}, {pad}, {pad}, {pad}]"
    return f"""
        <ir_version: 8, opset_import: ["" : {opset}]>
        g (float[1, 8, 6, 6] X) => (float[1, 4, 6, 6] Y1, float[1, 6, 6, 6] Y2, float[1, 3, 6, 6] Y3, float[1, 5, 6, 6] Y4)
        <float[4, 8, {k}, {k}] Wa, float[4] Ba, float[6, 8, {k}, {k}] Wb, float[3, 8, {k}, {k}] Wc, float[3] Bc,
         float[5, 8, 3, 3] Wd> {{
            A = Conv <{attrs}> (X, Wa, Ba)
            B = Conv <{attrs}> (X, Wb)
            C = Conv <{attrs}> (X, Wc, Bc)
            D = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1], strides = [1, 1]> (X, Wd)
            Y1 = Relu (A)
            Y2 = Sigmoid (B)
            Y3 = Identity (C)
            Y4 = Relu (D)
        }}
    """


@pytest.mark.parametrize("opset", [11, 13, 17, 18])
def test_sibling_convs_become_one_conv_and_split(opset: int) -> None:
    model = parse(split_text(opset))
    result = apply_pass(model, MergeParallelBranches(split_siblings=True))
    assert len(result.applied) == 1 and result.applied[0].nodes == ("Conv_0", "Conv_1", "Conv_2")
    assert ops(result.model) == {"Conv": 2, "Identity": 1, "Relu": 2, "Sigmoid": 1, "Split": 1}
    onnx.checker.check_model(result.model, full_check=True)
    assert_same_outputs(model, result.model)


def test_sibling_3x3_convs_with_a_graph_output_branch() -> None:
    text = split_text(17, k=3).replace("Y3 = Identity (C)", "Y3 = Identity (C)\n            Z = Relu (C)")
    text = text.replace("float[1, 5, 6, 6] Y4)", "float[1, 5, 6, 6] Y4, float[1, 3, 6, 6] Z, float[1, 6, 6, 6] B)")
    model = parse(text)
    result = apply_pass(model, MergeParallelBranches(split_siblings=True))
    # D is a 3x3 with the same geometry as A, B, C: four siblings.
    assert ops(result.model)["Split"] == 1 and ops(result.model)["Conv"] == 1
    onnx.checker.check_model(result.model, full_check=True)
    assert_same_outputs(model, result.model)


def test_split_skips_grouped_siblings() -> None:
    model = parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 4, 6, 6] X) => (float[1, 4, 6, 6] Y, float[1, 4, 6, 6] Z)
        <float[4, 2, 1, 1] Wa, float[4, 2, 1, 1] Wb> {
            A = Conv <kernel_shape = [1, 1], group = 2> (X, Wa)
            B = Conv <kernel_shape = [1, 1], group = 2> (X, Wb)
            Y = Relu (A)
            Z = Sigmoid (B)
        }
    """)
    assert any("grouped" in r for r in skip_reasons(model, split_siblings=True))


def test_sum_siblings_are_not_also_split() -> None:
    """Two 3x3 convs summed: a sum candidate, not a split one."""
    model = parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 4, 6, 6] X) => (float[1, 4, 6, 6] Y)
        <float[4, 4, 3, 3] Wa, float[4, 4, 3, 3] Wb> {
            A = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (X, Wa)
            B = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (X, Wb)
            Y = Add (A, B)
        }
    """)
    found = list(MergeParallelBranches().find(Model.from_source(model)))
    assert len(found) == 1 and "summed" in found[0].description
    result = apply_pass(model, MergeParallelBranches())
    assert ops(result.model) == {"Conv": 1}
    assert_same_outputs(model, result.model)


def test_source_model_is_not_modified() -> None:
    model = parse(repvgg_text())
    before = model.SerializeToString()
    apply_pass(model, MergeParallelBranches())
    assert model.SerializeToString() == before


def test_stale_candidate_raises() -> None:
    from rewriter.contract import RewriteError

    model = Model.from_source(parse(repvgg_text()))
    p = MergeParallelBranches()
    (cand,) = list(p.find(model))
    trial = model.fork()
    p.apply(trial, cand)
    again = trial.commit()
    with pytest.raises(RewriteError):
        p.apply(again.fork(), cand)


def test_split_of_siblings_is_off_by_default() -> None:
    """Conv + Split measured slower end to end on Inception-style blocks, so it is opt-in."""
    from models.sample import build_sample

    model = build_sample()
    assert not apply_pass(model, MergeParallelBranches()).modified
    assert apply_pass(model, MergeParallelBranches(split_siblings=True)).modified
