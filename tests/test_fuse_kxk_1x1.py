"""fuse_kxk_1x1: the weight math alone, then the pass on tiny ONNX-text models.

The model-text helpers and the numpy conv reference here are shared with ``test_fuse_1x1_kxk.py``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import onnx
import pytest

from passes.fuse_1x1_chain import dense_weight
from passes.fuse_kxk_1x1 import FuseKxk1x1, compose_kxk_then_1x1
from rewriter.model import Model
from rewriter.pipeline import apply_pass
from tests.helpers import assert_same_outputs, ops, parse

# -- shared helpers -----------------------------------------------------------------------------------


def conv_ref(
    x: np.ndarray,
    w: np.ndarray,
    b: np.ndarray | None = None,
    strides: Sequence[int] = (1, 1),
    pads: Sequence[int] = (0, 0, 0, 0),
    dilations: Sequence[int] = (1, 1),
    group: int = 1,
) -> np.ndarray:
    """A direct 2-D convolution in float64 (NCHW, weight [O, C/group, kh, kw], pads [top, left, bottom, right])."""
    x, w = x.astype(np.float64), w.astype(np.float64)
    n, _, h, wd = x.shape
    o, cg, kh, kw = w.shape
    (sh, sw), (dh, dw) = strides, dilations
    pt, pl, pb, pr = pads
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    ho = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    wo = (wd + pl + pr - dw * (kw - 1) - 1) // sw + 1
    og = o // group
    out = np.zeros((n, o, ho, wo))
    for g in range(group):
        xs = xp[:, g * cg : (g + 1) * cg]
        for i in range(kh):
            for j in range(kw):
                patch = xs[:, :, i * dh : i * dh + sh * (ho - 1) + 1 : sh, j * dw : j * dw + sw * (wo - 1) + 1 : sw]
                out[:, g * og : (g + 1) * og] += np.einsum("nchw,oc->nohw", patch, w[g * og : (g + 1) * og, :, i, j])
    if b is not None:
        out += b.astype(np.float64).reshape(1, -1, 1, 1)
    return out


def rand(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return (rng.standard_normal(shape) * 0.5).astype(np.float32)


def tensor_text(name: str, value: np.ndarray) -> str:
    """An initializer in ONNX text syntax (float32 values round-trip exactly through repr)."""
    dims = ",".join(str(d) for d in value.shape)
    return f"float[{dims}] {name} = {{{', '.join(repr(float(v)) for v in value.flat)}}}"


def attrs_text(
    kernel: Sequence[int],
    strides: Sequence[int] = (1, 1),
    pads: Sequence[int] | None = (0, 0, 0, 0),
    dilations: Sequence[int] = (1, 1),
    group: int = 1,
    auto_pad: str | None = None,
) -> str:
    def ints(v: Sequence[int]) -> str:
        return "[" + ",".join(str(int(i)) for i in v) + "]"

    parts = [f"kernel_shape={ints(kernel)}", f"strides={ints(strides)}", f"dilations={ints(dilations)}", f"group={group}"]
    if pads is not None:
        parts.append(f"pads={ints(pads)}")
    if auto_pad is not None:
        parts.append(f'auto_pad="{auto_pad}"')
    return ", ".join(parts)


def conv_line(out: str, inp: str, w: str, b: str | None, attrs: str) -> str:
    return f"{out} = Conv <{attrs}> ({inp}, {w}{', ' + b if b else ''})"


def model_text(
    opset: int,
    inputs: Sequence[tuple[str, Sequence[int]]],
    outputs: Sequence[str],
    inits: dict[str, np.ndarray],
    body: Sequence[str],
) -> onnx.ModelProto:
    """A checked model from ONNX text: float inputs with concrete shapes, 4-D outputs with symbolic dims."""
    ins = ", ".join(f"float[{','.join(str(d) for d in shape)}] {name}" for name, shape in inputs)
    outs = ", ".join(f"float[{o}_n,{o}_c,{o}_h,{o}_w] {o}" for o in outputs)
    init = f"<{', '.join(tensor_text(k, v) for k, v in inits.items())}>" if inits else ""
    lines = "\n    ".join(body)
    return parse(f'<ir_version: 8, opset_import: ["" : {opset}]>\ng ({ins}) => ({outs})\n{init}\n{{\n    {lines}\n}}')


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    (t,) = [t for t in model.graph.initializer if t.name == name]
    return onnx.numpy_helper.to_array(t)


def model_of(proto: onnx.ModelProto) -> Model:
    return Model.from_source(proto)


def check_fused(before: onnx.ModelProto, after: onnx.ModelProto, histogram: dict[str, int]) -> None:
    assert ops(after) == histogram
    onnx.checker.check_model(after, full_check=True)
    assert [o.name for o in after.graph.output] == [o.name for o in before.graph.output]
    assert_same_outputs(before, after)


# -- the model under test -----------------------------------------------------------------------------

BIASES = ("none", "first", "second", "both")


def kxk_1x1_model(
    *,
    c: int = 4,
    m: int = 8,
    o: int = 4,
    kernel: Sequence[int] = (3, 3),
    strides: Sequence[int] = (1, 1),
    pad: int = 0,
    dilations: Sequence[int] = (1, 1),
    group: int = 1,
    bias: str = "both",
    opset: int = 17,
    hw: int = 12,
    seed: int = 0,
) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits = {"W1": rand(rng, m, c // group, *kernel), "W2": rand(rng, o, m, 1, 1)}
    if bias in ("first", "both"):
        inits["B1"] = rand(rng, m)
    if bias in ("second", "both"):
        inits["B2"] = rand(rng, o)
    pads = [pad if k > 1 else 0 for k in kernel] * 2
    body = [
        conv_line("T", "X", "W1", "B1" if "B1" in inits else None, attrs_text(kernel, strides, pads, dilations, group)),
        conv_line("Y", "T", "W2", "B2" if "B2" in inits else None, attrs_text((1, 1))),
    ]
    return model_text(opset, [("X", (1, c, hw, hw))], ["Y"], inits, body)


# -- weight math alone ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", BIASES)
@pytest.mark.parametrize("strides,pads,dilations", [((1, 1), (0, 0, 0, 0), (1, 1)), ((2, 1), (1, 2, 0, 1), (1, 2))])
def test_compose_kxk_then_1x1_matches_two_convs(bias: str, strides, pads, dilations) -> None:
    rng = np.random.default_rng(1)
    x, w1, w2 = rand(rng, 2, 3, 9, 10), rand(rng, 6, 3, 3, 2), rand(rng, 5, 6, 1, 1)
    b1 = rand(rng, 6) if bias in ("first", "both") else None
    b2 = rand(rng, 5) if bias in ("second", "both") else None
    w, b = compose_kxk_then_1x1(w1, b1, w2, b2)
    assert w.shape == (5, 3, 3, 2)
    assert (b is None) == (bias == "none")
    want = conv_ref(conv_ref(x, w1, b1, strides, pads, dilations), w2, b2)
    np.testing.assert_allclose(conv_ref(x, w, b, strides, pads, dilations), want, rtol=1e-10, atol=1e-10)


def test_compose_kxk_then_1x1_accepts_a_2d_pointwise_weight_and_keeps_inputs() -> None:
    rng = np.random.default_rng(2)
    w1, b1, w2, b2 = rand(rng, 4, 2, 3, 3), rand(rng, 4), rand(rng, 3, 4), rand(rng, 3)
    copies = [a.copy() for a in (w1, b1, w2, b2)]
    w, b = compose_kxk_then_1x1(w1, b1, w2, b2)
    np.testing.assert_allclose(w[:, 1, 2, 0], w2.astype(np.float64) @ w1[:, 1, 2, 0].astype(np.float64))
    np.testing.assert_allclose(b, w2.astype(np.float64) @ b1 + b2, rtol=1e-12)
    for a, c in zip((w1, b1, w2, b2), copies):
        np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("group", [1, 2, 4])
def test_dense_weight_is_the_grouped_conv_as_a_dense_one(group: int) -> None:
    rng = np.random.default_rng(3)
    x, w = rand(rng, 1, 4, 7, 7), rand(rng, 8, 4 // group, 3, 3)
    dense = dense_weight(w, group)
    assert dense.shape == (8, 4, 3, 3)
    np.testing.assert_allclose(conv_ref(x, dense, pads=(1, 1, 1, 1)), conv_ref(x, w, pads=(1, 1, 1, 1), group=group), atol=1e-12)


# -- the pass ------------------------------------------------------------------------------------------

FUSE_CASES = list(
    itertools.product(BIASES, [(1, 1), (2, 2)], [0, 1], [(3, 3), (5, 5), (1, 3), (3, 1)], [(1, 1), (2, 2)], [13, 17])
)


@pytest.mark.parametrize("bias,strides,pad,kernel,dilations,opset", FUSE_CASES)
def test_fuses_kxk_then_1x1(bias, strides, pad, kernel, dilations, opset) -> None:
    model = kxk_1x1_model(bias=bias, strides=strides, pad=pad, kernel=kernel, dilations=dilations, opset=opset)
    result = apply_pass(model, FuseKxk1x1())
    assert result.modified and not result.skipped
    (cand,) = result.applied
    assert cand.nodes == ("Conv_0", "Conv_1")
    assert cand.cost.macs_after <= cand.cost.macs_before
    check_fused(model, result.model, {"Conv": 1})
    (node,) = result.model.graph.node
    assert len(node.input) == (2 if bias == "none" else 3)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["strides"] == list(strides) and attrs["dilations"] == list(dilations)
    assert attrs["kernel_shape"] == list(kernel)


def test_cost_counts_macs_before_and_after() -> None:
    # 3x3 16->64 (pad 1) then 1x1 64->16 on 8x8: 64 px * (64*16*9 + 16*64) -> 64 px * 16*16*9.
    model = kxk_1x1_model(c=16, m=64, o=16, pad=1, hw=8)
    (cand,) = FuseKxk1x1().find(model_of(model))
    assert (cand.cost.macs_before, cand.cost.macs_after) == (64 * 10240, 64 * 2304)
    assert (cand.cost.params_before, cand.cost.params_after) == (64 * 16 * 9 + 64 + 64 * 16 + 16, 16 * 16 * 9 + 16)
    assert "16->64" in cand.description and "64->16" in cand.description


def test_skips_where_macs_would_rise() -> None:
    # 3x3 16->16 then 1x1 16->64 on 8x8: 64 px * (16*16*9 + 64*16) = 212992 -> 64 px * 64*16*9 = 589824.
    model = kxk_1x1_model(c=16, m=16, o=64, pad=1, hw=8)
    result = apply_pass(model, FuseKxk1x1())
    assert not result.modified
    (skip,) = result.skipped
    assert skip.nodes == ("Conv_0", "Conv_1")
    assert skip.reason == "fusing would raise MACs from 212992 to 589824"


def test_equal_macs_still_fuse() -> None:
    # 3x3 1->6 then 1x1 6->18: 6*1*9 + 18*6 = 162 == 18*1*9 per pixel; one node fewer at equal MACs.
    model = kxk_1x1_model(c=1, m=6, o=18, pad=1, hw=6)
    result = apply_pass(model, FuseKxk1x1())
    (cand,) = result.applied
    assert cand.cost.macs_before == cand.cost.macs_after == 36 * 162
    check_fused(model, result.model, {"Conv": 1})


@pytest.mark.parametrize("group,m,o,fuses", [(2, 16, 4, True), (4, 32, 4, True), (4, 8, 4, False), (4, 4, 8, False)])
def test_grouped_kxk_fuses_into_a_dense_conv_when_macs_allow(group: int, m: int, o: int, fuses: bool) -> None:
    # group 2, 4->16, then 16->4: 16*2*9 + 4*16 = 352 -> 4*4*9 = 144 per pixel: fuses.
    # group 4, 4->32, then 32->4: 32*1*9 + 4*32 = 416 -> 144: fuses.
    # group 4, 4->8, then 8->4: 8*1*9 + 4*8 = 104 -> 144: raises, skipped.
    # depthwise 4->4 (group 4), then 4->8: 4*1*9 + 8*4 = 68 -> 8*4*9 = 288 per pixel: raises, skipped.
    model = kxk_1x1_model(c=4, m=m, o=o, group=group, pad=1, bias="both")
    result = apply_pass(model, FuseKxk1x1())
    assert result.modified == fuses
    if fuses:
        check_fused(model, result.model, {"Conv": 1})
        (node,) = result.model.graph.node
        assert {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}["group"] == 1
    else:
        (skip,) = result.skipped
        assert skip.reason.startswith("fusing would raise MACs")


def test_auto_pad_and_asymmetric_pads_are_kept() -> None:
    rng = np.random.default_rng(4)
    inits = {"W1": rand(rng, 8, 4, 3, 3), "B1": rand(rng, 8), "W2": rand(rng, 4, 8, 1, 1), "V1": rand(rng, 8, 4, 3, 2)}
    body = [
        conv_line("T", "X", "W1", "B1", attrs_text((3, 3), (2, 2), None, auto_pad="SAME_UPPER")),
        conv_line("Y", "T", "W2", None, attrs_text((1, 1))),
        conv_line("U", "X", "V1", None, attrs_text((3, 2), (1, 2), (0, 1, 2, 0))),
        conv_line("Z", "U", "W2", None, attrs_text((1, 1))),
    ]
    model = model_text(13, [("X", (1, 4, 11, 11))], ["Y", "Z"], inits, body)
    result = apply_pass(model, FuseKxk1x1())
    assert len(result.applied) == 2
    check_fused(model, result.model, {"Conv": 2})
    # The 1x1 weight W2 was shared by both pairs; it is read, never modified, and no longer needed.
    assert "W2" not in {t.name for t in result.model.graph.initializer}


def test_shared_kxk_weight_is_left_intact() -> None:
    rng = np.random.default_rng(5)
    w1 = rand(rng, 8, 4, 3, 3)
    inits = {"W1": w1, "W2": rand(rng, 4, 8, 1, 1)}
    body = [
        conv_line("T", "X", "W1", None, attrs_text((3, 3), pads=(1, 1, 1, 1))),
        conv_line("Y", "T", "W2", None, attrs_text((1, 1))),
        conv_line("Z", "X", "W1", None, attrs_text((3, 3))),  # another reader of W1
    ]
    model = model_text(17, [("X", (1, 4, 8, 8))], ["Y", "Z"], inits, body)
    result = apply_pass(model, FuseKxk1x1())
    assert result.modified
    check_fused(model, result.model, {"Conv": 2})
    np.testing.assert_array_equal(initializer(result.model, "W1"), w1)
    names = {t.name for t in result.model.graph.initializer}
    assert names == {"W1", "Conv_1_fused_W"}
    assert {n.name for n in result.model.graph.node} == {"Conv_0_Conv_1_fused", "Conv_2"}


def test_fuses_a_kxk_then_two_1x1s_to_a_fixed_point() -> None:
    # 3x3 4->16, 1x1 16->8, 1x1 8->4: two rounds, one conv left.
    rng = np.random.default_rng(6)
    inits = {"W1": rand(rng, 16, 4, 3, 3), "W2": rand(rng, 8, 16, 1, 1), "B2": rand(rng, 8), "W3": rand(rng, 4, 8, 1, 1)}
    body = [
        conv_line("T", "X", "W1", None, attrs_text((3, 3), pads=(1, 1, 1, 1))),
        conv_line("U", "T", "W2", "B2", attrs_text((1, 1))),
        conv_line("Y", "U", "W3", None, attrs_text((1, 1))),
    ]
    model = model_text(17, [("X", (1, 4, 8, 8))], ["Y"], inits, body)
    result = apply_pass(model, FuseKxk1x1())
    assert len(result.applied) == 2
    check_fused(model, result.model, {"Conv": 1})


def _pair(first_attrs: str, second_attrs: str, *, w2_shape=(4, 8, 1, 1), extra_body=(), outputs=("Y",), w2_input=False):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(7)
    inits = {"W1": rand(rng, 8, 4, 3, 3), "B1": rand(rng, 8)}
    inputs = [("X", (1, 4, 8, 8))]
    if w2_input:
        inputs.append(("W2", w2_shape))
    else:
        inits["W2"] = rand(rng, *w2_shape)
    body = [conv_line("T", "X", "W1", "B1", first_attrs), conv_line("Y", "T", "W2", None, second_attrs), *extra_body]
    return model_text(17, inputs, list(outputs), inits, body)


K3 = attrs_text((3, 3), pads=(1, 1, 1, 1))


@pytest.mark.parametrize(
    "model,reason",
    [
        (lambda: _pair(K3, attrs_text((1, 1)), outputs=("Y", "T")), "intermediate tensor 'T' is a graph output"),
        (lambda: _pair(K3, attrs_text((1, 1)), extra_body=["Z = Relu (T)"], outputs=("Y", "Z")), "intermediate tensor 'T' has 2 consumers"),
        (lambda: _pair(K3, attrs_text((1, 1)), w2_input=True), "Conv_1: weight or bias 'W2' is a graph input, not a constant"),
        (lambda: _pair(K3, attrs_text((1, 1), strides=(2, 2))), "Conv_1: the 1x1 conv has strides [2, 2], only stride 1 is fused"),
        (lambda: _pair(K3, attrs_text((1, 1), pads=(1, 1, 1, 1))), "Conv_1: padding on the 1x1 conv would add a border of bias values"),
        (lambda: _pair(K3, attrs_text((1, 1), group=2), w2_shape=(4, 4, 1, 1)), "Conv_1: grouped 1x1 conv (group 2)"),
    ],
)
def test_skips_with_reason(model, reason) -> None:  # type: ignore[no-untyped-def]
    proto = model()
    result = apply_pass(proto, FuseKxk1x1())
    assert not result.modified
    assert [s.reason for s in result.skipped] == [reason]


def test_skips_a_kxk_weight_fed_as_a_graph_input() -> None:
    rng = np.random.default_rng(8)
    body = [conv_line("T", "X", "W1", None, K3), conv_line("Y", "T", "W2", None, attrs_text((1, 1)))]
    model = model_text(17, [("X", (1, 4, 8, 8)), ("W1", (8, 4, 3, 3))], ["Y"], {"W2": rand(rng, 4, 8, 1, 1)}, body)
    (skip,) = apply_pass(model, FuseKxk1x1()).skipped
    assert skip.reason == "Conv_0: weight or bias 'W1' is a graph input, not a constant"


def test_ignores_non_adjacent_and_pointwise_pairs() -> None:
    rng = np.random.default_rng(9)
    inits = {"W1": rand(rng, 8, 4, 3, 3), "W2": rand(rng, 4, 8, 1, 1), "P1": rand(rng, 8, 4, 1, 1), "P2": rand(rng, 4, 8, 1, 1)}
    body = [
        conv_line("T", "X", "W1", None, K3),
        "R = Relu (T)",
        conv_line("Y", "R", "W2", None, attrs_text((1, 1))),
        conv_line("U", "X", "P1", None, attrs_text((1, 1))),  # 1x1 -> 1x1 belongs to fuse_1x1_chain
        conv_line("Z", "U", "P2", None, attrs_text((1, 1))),
    ]
    model = model_text(17, [("X", (1, 4, 8, 8))], ["Y", "Z"], inits, body)
    assert list(FuseKxk1x1().find(model_of(model))) == []
