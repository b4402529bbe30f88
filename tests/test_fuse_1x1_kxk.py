"""fuse_1x1_kxk: the weight math alone, the pass on tiny ONNX-text models, and the zero-padding border case."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import onnx
import pytest

from passes.fuse_1x1_kxk import BORDER_REASON, Fuse1x1Kxk, compose_1x1_then_kxk
from passes.fuse_1x1_chain import dense_weight
from rewriter.pipeline import apply_pass
from tests.helpers import RTOL, ATOL, feeds_for, run_reference
from tests.test_fuse_kxk_1x1 import BIASES, attrs_text, check_fused, conv_line, conv_ref, model_of, model_text, rand


def pointwise_kxk_model(
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
    zero_b1: bool = False,
    auto_pad: str | None = None,
    opset: int = 17,
    hw: int = 12,
    seed: int = 0,
) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits = {"W1": rand(rng, m, c, 1, 1), "W2": rand(rng, o, m // group, *kernel)}
    if bias in ("first", "both"):
        inits["B1"] = np.zeros(m, np.float32) if zero_b1 else rand(rng, m)
    if bias in ("second", "both"):
        inits["B2"] = rand(rng, o)
    pads = None if auto_pad else [pad if k > 1 else 0 for k in kernel] * 2
    body = [
        conv_line("T", "X", "W1", "B1" if "B1" in inits else None, attrs_text((1, 1))),
        conv_line("Y", "T", "W2", "B2" if "B2" in inits else None, attrs_text(kernel, strides, pads, dilations, group, auto_pad)),
    ]
    return model_text(opset, [("X", (1, c, hw, hw))], ["Y"], inits, body)


# -- weight math alone ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", BIASES)
@pytest.mark.parametrize("strides,dilations", [((1, 1), (1, 1)), ((2, 1), (1, 2))])
def test_compose_1x1_then_kxk_matches_two_convs_without_padding(bias: str, strides, dilations) -> None:
    rng = np.random.default_rng(1)
    x, w1, w2 = rand(rng, 2, 3, 9, 10), rand(rng, 6, 3, 1, 1), rand(rng, 5, 6, 3, 2)
    b1 = rand(rng, 6) if bias in ("first", "both") else None
    b2 = rand(rng, 5) if bias in ("second", "both") else None
    w, b = compose_1x1_then_kxk(w1, b1, w2, b2)
    assert w.shape == (5, 3, 3, 2)
    assert (b is None) == (bias == "none")
    want = conv_ref(conv_ref(x, w1, b1), w2, b2, strides, dilations=dilations)
    np.testing.assert_allclose(conv_ref(x, w, b, strides, dilations=dilations), want, rtol=1e-10, atol=1e-10)


def test_compose_1x1_then_kxk_is_exact_with_padding_when_b1_is_zero() -> None:
    rng = np.random.default_rng(2)
    x, w1, w2, b2 = rand(rng, 1, 3, 6, 6), rand(rng, 4, 3), rand(rng, 2, 4, 3, 3), rand(rng, 2)
    b1 = np.zeros(4, np.float32)
    w, b = compose_1x1_then_kxk(w1, b1, w2, b2)
    pads = (1, 2, 0, 1)
    want = conv_ref(conv_ref(x, w1.reshape(4, 3, 1, 1), b1), w2, b2, pads=pads)
    np.testing.assert_allclose(conv_ref(x, w, b, pads=pads), want, rtol=1e-10, atol=1e-10)


def test_compose_1x1_then_kxk_bias_formula_and_inputs_untouched() -> None:
    rng = np.random.default_rng(3)
    w1, b1, w2, b2 = rand(rng, 4, 3, 1, 1), rand(rng, 4), rand(rng, 2, 4, 3, 3), rand(rng, 2)
    copies = [a.copy() for a in (w1, b1, w2, b2)]
    w, b = compose_1x1_then_kxk(w1, b1, w2, b2)
    want_b = b2 + np.einsum("omij,m->o", w2.astype(np.float64), b1.astype(np.float64))
    np.testing.assert_allclose(b, want_b, rtol=1e-12)
    np.testing.assert_allclose(w[1, 2, 0, 1], w2[1, :, 0, 1].astype(np.float64) @ w1[:, 2, 0, 0].astype(np.float64))
    for a, c in zip((w1, b1, w2, b2), copies):
        np.testing.assert_array_equal(a, c)


# -- the pass ------------------------------------------------------------------------------------------

# Every variant that folds exactly: a nonzero first bias only where the KxK conv does not pad.
FUSE_CASES = [
    case
    for case in itertools.product(BIASES, [(1, 1), (2, 2)], [0, 1], [(3, 3), (5, 5), (1, 3), (3, 1)], [(1, 1), (2, 2)], [13, 17])
    if not (case[2] and case[0] in ("first", "both"))
]


@pytest.mark.parametrize("bias,strides,pad,kernel,dilations,opset", FUSE_CASES)
def test_fuses_1x1_then_kxk(bias, strides, pad, kernel, dilations, opset) -> None:
    model = pointwise_kxk_model(bias=bias, strides=strides, pad=pad, kernel=kernel, dilations=dilations, opset=opset)
    result = apply_pass(model, Fuse1x1Kxk())
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


@pytest.mark.parametrize("bias", ["first", "both"])
@pytest.mark.parametrize("pad", [1, 2])
def test_fuses_with_padding_when_the_first_bias_is_all_zero(bias: str, pad: int) -> None:
    model = pointwise_kxk_model(bias=bias, pad=pad, zero_b1=True)
    result = apply_pass(model, Fuse1x1Kxk())
    assert result.modified
    check_fused(model, result.model, {"Conv": 1})


@pytest.mark.parametrize("auto_pad,fuses", [("VALID", True), ("SAME_UPPER", False), ("SAME_LOWER", False)])
def test_auto_pad_counts_as_padding(auto_pad: str, fuses: bool) -> None:
    model = pointwise_kxk_model(bias="both", auto_pad=auto_pad, strides=(2, 2), hw=11)
    result = apply_pass(model, Fuse1x1Kxk())
    assert result.modified == fuses
    if fuses:
        check_fused(model, result.model, {"Conv": 1})
    else:
        assert [s.reason for s in result.skipped] == [BORDER_REASON]


# -- the border case -----------------------------------------------------------------------------------


def test_skips_a_biased_1x1_into_a_padded_kxk() -> None:
    model = pointwise_kxk_model(bias="first", pad=1)
    result = apply_pass(model, Fuse1x1Kxk())
    assert not result.modified and not result.applied
    (skip,) = result.skipped
    assert skip.nodes == ("Conv_0", "Conv_1")
    assert skip.reason == BORDER_REASON == "the first conv's bias would meet the KxK conv's zero padding at the borders"


def test_the_naive_fold_is_wrong_exactly_at_the_borders() -> None:
    """Why the skip above is necessary: folding b1 anyway changes every output whose window meets padding."""
    c, m, o, hw = 4, 8, 4, 7
    model = pointwise_kxk_model(c=c, m=m, o=o, bias="both", pad=1, hw=hw)
    init = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    w, b = compose_1x1_then_kxk(init["W1"], init["B1"], init["W2"], init["B2"])
    body = [conv_line("Y", "X", "W", "B", attrs_text((3, 3), pads=(1, 1, 1, 1)))]
    naive = model_text(17, [("X", (1, c, hw, hw))], ["Y"], {"W": w.astype(np.float32), "B": b.astype(np.float32)}, body)

    feeds = feeds_for(model, count=2)
    for (want,), (got,) in zip(run_reference(model, feeds), run_reference(naive, feeds)):
        interior = (slice(None), slice(None), slice(1, -1), slice(1, -1))
        np.testing.assert_allclose(got[interior], want[interior], rtol=RTOL, atol=ATOL)
        border = np.ones(want.shape, bool)
        border[interior] = False
        assert not np.allclose(got[border], want[border], rtol=RTOL, atol=ATOL)
        # The error is b1's contribution through the padded taps: sum over all taps minus the in-image ones.
        b1_image = np.broadcast_to(init["B1"].reshape(1, m, 1, 1), (1, m, hw, hw))
        in_image = conv_ref(b1_image, init["W2"], pads=(1, 1, 1, 1))
        all_taps = np.einsum("omij,m->o", init["W2"].astype(np.float64), init["B1"].astype(np.float64))
        np.testing.assert_allclose(got - want, all_taps.reshape(1, o, 1, 1) - in_image, rtol=1e-3, atol=1e-4)


# -- MACs ----------------------------------------------------------------------------------------------


def test_cost_counts_macs_before_and_after() -> None:
    # 1x1 4->8 then 3x3 8->4 (pad 1) on 12x12: 144 px * (8*4 + 4*8*9) -> 144 px * 4*4*9.
    model = pointwise_kxk_model(pad=1, bias="second")
    (cand,) = Fuse1x1Kxk().find(model_of(model))
    assert (cand.cost.macs_before, cand.cost.macs_after) == (144 * 320, 144 * 144)
    assert (cand.cost.params_before, cand.cost.params_after) == (32 + 288 + 4, 144 + 4)
    assert "4->8" in cand.description and "8->4" in cand.description


def test_skips_where_macs_would_rise() -> None:
    # 1x1 64->16 then 3x3 16->16 (pad 1) on 8x8: 64 px * (16*64 + 16*16*9) = 212992 -> 64 px * 16*64*9 = 589824.
    model = pointwise_kxk_model(c=64, m=16, o=16, pad=1, bias="second", hw=8)
    result = apply_pass(model, Fuse1x1Kxk())
    assert not result.modified
    (skip,) = result.skipped
    assert skip.reason == "fusing would raise MACs from 212992 to 589824"


def test_strided_kxk_counts_the_1x1_at_full_resolution() -> None:
    # 1x1 8->16 on 12x12 = 144*128; 3x3 16->8 stride 2 (no pad) -> 5x5: 25*8*16*9. After: 25*8*8*9.
    model = pointwise_kxk_model(c=8, m=16, o=8, strides=(2, 2), bias="none")
    (cand,) = Fuse1x1Kxk().find(model_of(model))
    assert (cand.cost.macs_before, cand.cost.macs_after) == (144 * 128 + 25 * 1152, 25 * 576)


@pytest.mark.parametrize("group,m,o,fuses", [(2, 8, 4, True), (4, 16, 8, True), (8, 8, 8, False)])
def test_grouped_kxk_fuses_into_a_dense_conv_when_macs_allow(group: int, m: int, o: int, fuses: bool) -> None:
    # 1x1 4->8, 3x3 8->4 group 2: 8*4 + 4*4*9 = 176 -> 4*4*9 = 144 per pixel: fuses.
    # 1x1 4->16, 3x3 16->8 group 4: 16*4 + 8*4*9 = 352 -> 8*4*9 = 288: fuses.
    # 1x1 4->8, depthwise 3x3 8->8: 8*4 + 8*9 = 104 -> 8*4*9 = 288: raises, skipped.
    model = pointwise_kxk_model(c=4, m=m, o=o, group=group, bias="second", pad=1)
    result = apply_pass(model, Fuse1x1Kxk())
    assert result.modified == fuses
    if fuses:
        check_fused(model, result.model, {"Conv": 1})
        (node,) = result.model.graph.node
        assert {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}["group"] == 1
    else:
        (skip,) = result.skipped
        assert skip.reason.startswith("fusing would raise MACs")


def test_grouped_weight_expansion_feeds_the_composition() -> None:
    rng = np.random.default_rng(4)
    x, w1, b1, w2 = rand(rng, 1, 3, 6, 6), rand(rng, 8, 3, 1, 1), rand(rng, 8), rand(rng, 4, 4, 3, 3)
    w, b = compose_1x1_then_kxk(w1, b1, dense_weight(w2, 2), None)
    want = conv_ref(conv_ref(x, w1, b1), w2, group=2)
    np.testing.assert_allclose(conv_ref(x, w, b), want, rtol=1e-10, atol=1e-10)


# -- preconditions -------------------------------------------------------------------------------------


def _pair(first_attrs: str, *, w1_shape=(8, 4, 1, 1), extra_body=(), outputs=("Y",), w2_input=False, int_bias=False):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(7)
    inits = {"W1": rand(rng, *w1_shape), "B1": rand(rng, 8)}
    inputs = [("X", (1, 4, 8, 8))]
    if w2_input:
        inputs.append(("W2", (4, 8, 3, 3)))
    else:
        inits["W2"] = rand(rng, 4, 8, 3, 3)
    body = [conv_line("T", "X", "W1", "B1", first_attrs), conv_line("Y", "T", "W2", None, attrs_text((3, 3))), *extra_body]
    return model_text(17, inputs, list(outputs), inits, body)


P1 = attrs_text((1, 1))


@pytest.mark.parametrize(
    "model,reason",
    [
        (lambda: _pair(P1, outputs=("Y", "T")), "intermediate tensor 'T' is a graph output"),
        (lambda: _pair(P1, extra_body=["Z = Relu (T)"], outputs=("Y", "Z")), "intermediate tensor 'T' has 2 consumers"),
        (lambda: _pair(P1, w2_input=True), "Conv_1: weight or bias 'W2' is a graph input, not a constant"),
        (lambda: _pair(attrs_text((1, 1), strides=(2, 2))), "Conv_0: the 1x1 conv has strides [2, 2], only stride 1 is fused"),
        (lambda: _pair(attrs_text((1, 1), pads=(1, 1, 1, 1))), "Conv_0: padding on the 1x1 conv would add a border of bias values"),
        (lambda: _pair(attrs_text((1, 1), group=2), w1_shape=(8, 2, 1, 1)), "Conv_0: grouped 1x1 conv (group 2)"),
    ],
)
def test_skips_with_reason(model, reason) -> None:  # type: ignore[no-untyped-def]
    result = apply_pass(model(), Fuse1x1Kxk())
    assert not result.modified
    assert [s.reason for s in result.skipped] == [reason]


def test_ignores_non_adjacent_pairs_and_kxk_into_1x1() -> None:
    rng = np.random.default_rng(9)
    inits = {"W1": rand(rng, 8, 4, 1, 1), "W2": rand(rng, 4, 8, 3, 3), "K1": rand(rng, 8, 4, 3, 3), "P2": rand(rng, 4, 8, 1, 1)}
    body = [
        conv_line("T", "X", "W1", None, P1),
        "R = Relu (T)",
        conv_line("Y", "R", "W2", None, attrs_text((3, 3))),
        conv_line("U", "X", "K1", None, attrs_text((3, 3))),  # KxK -> 1x1 belongs to fuse_kxk_1x1
        conv_line("Z", "U", "P2", None, P1),
    ]
    model = model_text(17, [("X", (1, 4, 8, 8))], ["Y", "Z"], inits, body)
    assert list(Fuse1x1Kxk().find(model_of(model))) == []


def test_shared_weights_are_left_intact_and_names_are_fresh() -> None:
    rng = np.random.default_rng(10)
    w1, w2 = rand(rng, 8, 4, 1, 1), rand(rng, 4, 8, 3, 3)
    inits = {"W1": w1, "W2": w2, "Conv_0_fused_W": rand(rng, 8, 4, 1, 1)}
    body = [
        conv_line("T", "X", "W1", None, P1),
        conv_line("Y", "T", "W2", None, attrs_text((3, 3), pads=(1, 1, 1, 1))),
        conv_line("U", "X", "W1", None, P1),  # other readers of W1 and of a tensor named like the fused weight
        conv_line("Z", "X", "Conv_0_fused_W", None, P1),
    ]
    model = model_text(17, [("X", (1, 4, 8, 8))], ["Y", "U", "Z"], inits, body)
    result = apply_pass(model, Fuse1x1Kxk())
    assert result.modified
    check_fused(model, result.model, {"Conv": 3})
    got = {t.name: onnx.numpy_helper.to_array(t) for t in result.model.graph.initializer}
    np.testing.assert_array_equal(got["W1"], w1)
    assert "W2" not in got and set(got) == {"W1", "Conv_0_fused_W", "Conv_0_fused_W_0"}
