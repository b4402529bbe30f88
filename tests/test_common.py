"""passes.common: the helpers every pass shares, each alone on tiny ONNX-text graphs or arrays."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from passes.common import (
    ConvGeometry,
    batchnorm_scale_shift,
    bias_tensor,
    bias_value,
    conv_auto_pad,
    conv_geometry,
    conv_group,
    conv_kernel,
    conv_padding_free,
    is_pointwise_conv,
    opset,
    optional_input,
    weight_value,
)
from rewriter.model import Model
from tests.helpers import parse


def _model(body: str, decls: str = "<float[4, 2, 3, 3] W, float[4] B>", opset_version: int = 17) -> Model:
    text = f"""
    <ir_version: 8, opset_import: ["" : {opset_version}]>
    g (float[1, 2, 8, 8] X, float[4, 2, 3, 3] Wd) => (float[N, C, H, W] Y)
    {decls}
    {{
        {body}
    }}
    """
    return Model.from_source(parse(text))


def _node(model: Model, name: str):  # type: ignore[no-untyped-def]
    node = model.node(name)
    assert node is not None
    return node


# -- inputs ----------------------------------------------------------------------------------------------


def test_bias_and_weight_of_a_conv_with_bias() -> None:
    m = _model("Y = Conv <pads = [1, 1, 1, 1]> (X, W, B)")
    conv = _node(m, "Conv_0")
    assert weight_value(conv).shape == (4, 2, 3, 3)  # type: ignore[union-attr]
    assert bias_tensor(conv) is conv.inputs[2]
    b = bias_value(conv)
    assert b is not None and b.shape == (4,)
    np.testing.assert_array_equal(b, onnx.numpy_helper.to_array(next(t for t in m.proto.graph.initializer if t.name == "B")))


def test_bias_absent_or_omitted_is_none() -> None:
    m = _model("T = Conv <pads = [1, 1, 1, 1]> (X, W)\n        Y = Conv <pads = [1, 1, 1, 1]> (X, W, \"\")",
               "<float[4, 2, 3, 3] W>")
    for name in ("Conv_0", "Conv_1"):
        conv = _node(m, name)
        assert bias_tensor(conv) is None and bias_value(conv) is None
        assert optional_input(conv, 2) is None
    assert optional_input(_node(m, "Conv_0"), 5) is None
    assert optional_input(_node(m, "Conv_0"), 1) is _node(m, "Conv_0").inputs[1]


def test_weight_that_is_a_graph_input_has_no_value() -> None:
    m = _model("Y = Conv <pads = [1, 1, 1, 1]> (X, Wd, B)")
    conv = _node(m, "Conv_0")
    assert weight_value(conv) is None
    assert bias_value(conv) is not None


def test_opset_reads_the_default_domain() -> None:
    assert opset(_model("Y = Conv <pads = [1, 1, 1, 1]> (X, W, B)", opset_version=13)) == 13
    m = _model("Y = Conv <pads = [1, 1, 1, 1]> (X, W, B)", opset_version=11)
    del m.proto.opset_import[:]
    m.proto.opset_import.extend([onnx.helper.make_opsetid("com.example", 3)])
    assert opset(m) == 1
    m.proto.opset_import.extend([onnx.helper.make_opsetid("ai.onnx", 15)])
    assert opset(m) == 15


# -- geometry --------------------------------------------------------------------------------------------


def test_conv_geometry_defaults_and_attributes() -> None:
    m = _model(
        "A = Conv (X, W)\n"
        "        Y = Conv <kernel_shape = [3, 3], strides = [2, 1], pads = [1, 0, 1, 2], dilations = [1, 2], group = 1> (X, W, B)",
        "<float[4, 2, 3, 3] W, float[4] B>",
    )
    # the first conv's output shape is not declared; only its geometry matters here
    assert conv_geometry(_node(m, "Conv_0")) == ConvGeometry((3, 3), (1, 1), (0, 0, 0, 0), (1, 1), 1)
    assert conv_geometry(_node(m, "Conv_1")) == ConvGeometry((3, 3), (2, 1), (1, 0, 1, 2), (1, 2), 1)


def test_conv_geometry_auto_pad() -> None:
    m = _model('A = Conv <auto_pad = "VALID", pads = [1, 1, 1, 1]> (X, W)\n'
               '        Y = Conv <auto_pad = "SAME_UPPER"> (X, W, B)')
    assert conv_geometry(_node(m, "Conv_0")) == ConvGeometry((3, 3), (1, 1), (0, 0, 0, 0), (1, 1), 1)
    assert conv_geometry(_node(m, "Conv_1")) == "Conv_1: auto_pad SAME_UPPER is not handled"


def test_conv_geometry_valid_pads_reads_explicit_pads_beside_valid_as_zero_or_as_written() -> None:
    m = _model('A = Conv <auto_pad = "VALID", pads = [1, 0, 1, 2]> (X, W)\n'
               '        T = Conv <auto_pad = "VALID"> (X, W)\n'
               "        Y = Conv <pads = [1, 0, 1, 2]> (X, W, B)")
    invalid, valid, notset = _node(m, "Conv_0"), _node(m, "Conv_1"), _node(m, "Conv_2")
    assert conv_geometry(invalid) == conv_geometry(invalid, valid_pads="zero") == ConvGeometry((3, 3), (1, 1), (0, 0, 0, 0), (1, 1), 1)
    assert conv_geometry(invalid, valid_pads="attribute") == ConvGeometry((3, 3), (1, 1), (1, 0, 1, 2), (1, 1), 1)
    # the two readings agree where ONNX allows the attributes: VALID without pads, NOTSET with them
    for node in (valid, notset):
        assert conv_geometry(node, valid_pads="attribute") == conv_geometry(node, valid_pads="zero")
    assert conv_geometry(valid).pads == (0, 0, 0, 0) and conv_geometry(notset).pads == (1, 0, 1, 2)


def test_conv_auto_pad_and_group() -> None:
    m = _model('A = Conv (X, W)\n        Y = Conv <auto_pad = "SAME_LOWER", group = 2> (X, Wg)',
               "<float[4, 2, 3, 3] W, float[4, 1, 3, 3] Wg>")
    plain, same = _node(m, "Conv_0"), _node(m, "Conv_1")
    assert (conv_auto_pad(plain), conv_group(plain)) == ("NOTSET", 1)
    assert (conv_auto_pad(same), conv_group(same)) == ("SAME_LOWER", 2)
    # a graph edited in process may hold bytes (onnx-graphsurgeon decodes string attributes it loads)
    plain.attrs["auto_pad"] = b"VALID"
    assert conv_auto_pad(plain) == "VALID"
    assert conv_geometry(plain) == ConvGeometry((3, 3), (1, 1), (0, 0, 0, 0), (1, 1), 1)
    plain.attrs["auto_pad"] = b"SAME_UPPER"
    assert conv_geometry(plain) == "Conv_0: auto_pad SAME_UPPER is not handled"


def test_conv_geometry_unknown_kernel() -> None:
    m = _model("Y = Conv <pads = [1, 1, 1, 1]> (X, Wd, B)")
    conv = _node(m, "Conv_0")
    assert conv_kernel(conv) is None
    assert conv_geometry(conv) == "Conv_0: kernel shape unknown"
    conv.attrs["kernel_shape"] = [3, 3]
    assert conv_kernel(conv) == (3, 3)


@pytest.mark.parametrize(
    "decl,attrs,pointwise",
    [
        ("float[4, 2, 1, 1] W", "", True),
        ("float[4, 2, 1, 1] W", "<kernel_shape = [1, 1], strides = [2, 2]>", True),
        ("float[4, 2, 3, 3] W", "", False),
        ("float[4, 2, 1, 3] W", "", False),
    ],
)
def test_is_pointwise_conv(decl: str, attrs: str, pointwise: bool) -> None:
    m = _model(f"Y = Conv {attrs} (X, W)", f"<{decl}>")
    assert is_pointwise_conv(_node(m, "Conv_0")) is pointwise


def test_is_pointwise_conv_needs_a_conv_with_a_known_kernel() -> None:
    m = _model("Y = Conv (X, Wd)\n", "<float[4] B>")
    assert not is_pointwise_conv(_node(m, "Conv_0"))  # kernel of a graph-input weight is unknown
    relu = _model("T = Conv <pads = [1, 1, 1, 1]> (X, W, B)\n        Y = Relu (T)")
    assert not is_pointwise_conv(_node(relu, "Relu_1"))


@pytest.mark.parametrize(
    "attrs,free",
    [("", True), ("<pads = [0, 0, 0, 0]>", True), ('<auto_pad = "VALID">', True), ("<pads = [0, 1, 0, 1]>", False),
     ('<auto_pad = "SAME_LOWER">', False)],
)
def test_conv_padding_free(attrs: str, free: bool) -> None:
    m = _model(f"Y = Conv {attrs} (X, W)", "<float[4, 2, 1, 1] W>")
    assert conv_padding_free(_node(m, "Conv_0")) is free


# -- batchnorm -------------------------------------------------------------------------------------------


def test_batchnorm_scale_shift_is_the_batchnorm_formula() -> None:
    r = np.random.default_rng(0)
    gamma, beta, mean = (r.standard_normal(5).astype(np.float32) for _ in range(3))
    var = r.uniform(0.5, 1.5, 5).astype(np.float32)
    snapshot = [a.copy() for a in (gamma, beta, mean, var)]
    eps = 1e-3
    s, t = batchnorm_scale_shift(gamma, beta, mean, var, eps)
    assert s.dtype == np.float64 and t.dtype == np.float64 and s.shape == t.shape == (5,)
    g64, b64, m64, v64 = (a.astype(np.float64) for a in (gamma, beta, mean, var))
    np.testing.assert_allclose(s, g64 / np.sqrt(v64 + eps), rtol=1e-15)
    np.testing.assert_allclose(t, b64 - m64 * g64 / np.sqrt(v64 + eps), rtol=1e-12, atol=1e-15)
    y = r.standard_normal((2, 5, 3, 3))
    bn = (y - m64[:, None, None]) / np.sqrt(v64[:, None, None] + eps) * g64[:, None, None] + b64[:, None, None]
    np.testing.assert_allclose(y * s[:, None, None] + t[:, None, None], bn, rtol=1e-12, atol=1e-12)
    for before, after in zip(snapshot, (gamma, beta, mean, var)):
        np.testing.assert_array_equal(before, after)


def test_batchnorm_scale_shift_is_the_affine_map_of_batchnorm() -> None:
    rng = np.random.default_rng(3)
    g, be, m, v = rng.standard_normal(4), rng.standard_normal(4), rng.standard_normal(4), rng.uniform(0.5, 1.5, 4)
    x = rng.standard_normal(4)
    s, t = batchnorm_scale_shift(g, be, m, v, 1e-3)
    np.testing.assert_allclose(s * x + t, g * (x - m) / np.sqrt(v + 1e-3) + be, rtol=1e-12)
