"""Input-shape parsing and resolution, and shape inference that never raises."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from rewriter.errors import InputError
from rewriter.shapes import (
    graph_inputs, infer_tensor_info, input_shape_notes, parse_input_shape, parse_input_shapes, resolve_input_shapes, shape_example,
)
from tests.helpers import parse


# -- parse_input_shape ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "name", "shape"),
    [
        ("x:1x3x224x224", "x", (1, 3, 224, 224)),
        ("input:0:1x224x224x3", "input:0", (1, 224, 224, 3)),  # TF-style names contain ':'
        ("a:b:c:7", "a:b:c", (7,)),
        ("x:2X3", "x", (2, 3)),
        ("x:scalar", "x", ()),
    ],
)
def test_parse_input_shape(text: str, name: str, shape: tuple[int, ...]) -> None:
    assert parse_input_shape(text) == (name, shape)


@pytest.mark.parametrize(
    "text",
    ["x", "x1x3", ":1x3", "x:", "x:1x", "x:1xax3", "x:1.5x3", "x:0x3", "x:-1x3", "input:0:", "x:1x3x"],
)
def test_parse_input_shape_rejects_bad_text(text: str) -> None:
    with pytest.raises(InputError) as info:
        parse_input_shape(text)
    assert "--input-shape" in str(info.value)
    assert "\n" not in str(info.value)


def test_parse_input_shapes_keeps_every_input() -> None:
    assert parse_input_shapes(["a:1x2", "b:0:3"]) == {"a": (1, 2), "b:0": (3,)}
    assert parse_input_shapes([]) == {}


# -- resolve_input_shapes ------------------------------------------------------------------------------
def two_input_model(a_dims: str, b_dims: str) -> onnx.ModelProto:
    """Two independent inputs, each through a Relu; dims are ONNX-text dims, e.g. 'N,3,8,8'."""
    return parse(
        f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[{a_dims}] a, float[{b_dims}] b) => (float[{a_dims}] ra, float[{b_dims}] rb) {{
            ra = Relu(a)
            rb = Relu(b)
        }}
        """
    )


def test_static_dims_resolve_as_declared() -> None:
    model = two_input_model("1,3,8,8", "1,3,8,8")
    assert resolve_input_shapes(model) == {"a": (1, 3, 8, 8), "b": (1, 3, 8, 8)}


def test_symbolic_leading_batch_dim_defaults_to_one() -> None:
    model = two_input_model("N,3,8,8", "batch,3,8,8")
    assert resolve_input_shapes(model) == {"a": (1, 3, 8, 8), "b": (1, 3, 8, 8)}


def test_override_beats_the_batch_default() -> None:
    model = two_input_model("N,3,8,8", "N,3,8,8")
    assert resolve_input_shapes(model, {"a": (4, 3, 8, 8)}) == {"a": (4, 3, 8, 8), "b": (1, 3, 8, 8)}


@pytest.mark.parametrize("dims", ["1,3,H,W", "N,3,H,8", "L"])
def test_other_symbolic_dims_need_an_override(dims: str) -> None:
    model = two_input_model(dims, "1,3,8,8")
    with pytest.raises(InputError) as info:
        resolve_input_shapes(model)
    message = str(info.value)
    assert "'a'" in message
    assert "--input-shape a:" in message
    assert "\n" not in message


def test_the_error_gives_the_flag_to_pass_with_the_known_dims() -> None:
    with pytest.raises(InputError, match=r"^input 'a' has dynamic dims \['N', 3, 'H', 'W'\]; pass --input-shape a:1x3xHxW$"):
        resolve_input_shapes(two_input_model("N,3,H,W", "1,3,8,8"))


@pytest.mark.parametrize(
    ("dims", "example"),
    [
        (["N", 3, "H", "W"], "1x3xHxW"),
        (["batch", "h", "w", 3], "1xHxWx3"),  # NHWC
        ([None, 3, "?", "?"], "1x3xHxW"),
        (["N", "C", "H", "W"], "1xCxHxW"),
        ([1, "T", 512], "1xD1x512"),
        (["L"], "D0"),
    ],
)
def test_shape_example_fills_in_the_known_dims(dims: list, example: str) -> None:
    assert shape_example(dims) == example


def test_input_shape_notes_name_each_defaulted_batch_dim() -> None:
    model = two_input_model("N,3,8,8", "1,3,8,8")
    assert resolve_input_shapes(model) == {"a": (1, 3, 8, 8), "b": (1, 3, 8, 8)}
    note = {"input": "a", "dim": 0, "declared": "N", "value": 1, "note": "symbolic leading (batch) dim N taken as 1"}
    assert input_shape_notes(model) == [note]
    assert input_shape_notes(model, {"a": (2, 3, 8, 8)}) == []  # told: nothing taken by default
    unnamed = two_input_model("N,3,8,8", "1,3,8,8")
    unnamed.graph.input[0].type.tensor_type.shape.dim[0].ClearField("dim_param")
    assert [(n["declared"], n["note"]) for n in input_shape_notes(unnamed)] == [(None, "symbolic leading (batch) dim ? taken as 1")]


def test_symbolic_dims_resolve_with_an_override() -> None:
    model = two_input_model("N,3,H,W", "1,3,8,8")
    assert resolve_input_shapes(model, {"a": (2, 3, 8, 8)}) == {"a": (2, 3, 8, 8), "b": (1, 3, 8, 8)}


def test_override_with_wrong_rank_is_rejected() -> None:
    model = two_input_model("N,3,H,W", "1,3,8,8")
    with pytest.raises(InputError, match=r"rank 3 given, the model declares rank 4"):
        resolve_input_shapes(model, {"a": (1, 3, 8)})


def test_override_conflicting_with_a_fixed_dim_is_rejected() -> None:
    model = two_input_model("N,3,H,W", "1,3,8,8")
    with pytest.raises(InputError, match=r"dim 1 is 4, the model fixes it to 3"):
        resolve_input_shapes(model, {"a": (1, 4, 8, 8)})


def test_override_of_an_unknown_input_is_rejected() -> None:
    model = two_input_model("1,3,8,8", "1,3,8,8")
    with pytest.raises(InputError) as info:
        resolve_input_shapes(model, {"c": (1, 3, 8, 8)})
    assert "'c'" in str(info.value) and "not an input" in str(info.value)


def test_input_without_declared_shape_needs_an_override() -> None:
    model = two_input_model("1,3,8,8", "1,3,8,8")
    model.graph.input[1].type.tensor_type.ClearField("shape")
    with pytest.raises(InputError, match=r"'b' has no declared shape; pass --input-shape b:"):
        resolve_input_shapes(model)
    assert resolve_input_shapes(model, {"b": (1, 3, 8, 8)})["b"] == (1, 3, 8, 8)


def test_initializers_listed_as_inputs_are_not_inputs() -> None:
    """Old exporters list weights among the graph inputs; they need no --input-shape."""
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,4] x, float[4] w) => (float[N,4] y) <float[4] w = {1.0, 2.0, 3.0, 4.0}> {
            y = Mul(x, w)
        }
        """
    )
    assert [vi.name for vi in graph_inputs(model)] == ["x"]
    assert resolve_input_shapes(model) == {"x": (1, 4)}


def test_resolution_does_not_modify_the_model() -> None:
    model = two_input_model("N,3,H,W", "1,3,8,8")
    before = model.SerializeToString()
    resolve_input_shapes(model, {"a": (2, 3, 8, 8)})
    infer_tensor_info(model, {"a": (2, 3, 8, 8), "b": (1, 3, 8, 8)})
    assert model.SerializeToString() == before


# -- infer_tensor_info ---------------------------------------------------------------------------------
CONV_NET = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,3,16,16] x) => (float[N,8] y)
  <float[8,3,3,3] W = {%s}, float[8] B = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0}> {
    c = Conv <pads = [1, 1, 1, 1], strides = [2, 2]> (x, W, B)
    r = Relu(c)
    p = GlobalAveragePool(r)
    y = Flatten <axis = 1> (p)
}
""" % ", ".join(["0.5"] * (8 * 3 * 3 * 3))


def test_infer_tensor_info_on_a_conv_net() -> None:
    model = parse(CONV_NET)
    shapes = resolve_input_shapes(model)
    assert shapes == {"x": (1, 3, 16, 16)}
    info = infer_tensor_info(model, shapes)
    # Conv: floor((16 + 1 + 1 - 3) / 2) + 1 = 8
    assert info["x"].static_shape == (1, 3, 16, 16)
    assert info["c"].static_shape == (1, 8, 8, 8)
    assert info["r"].static_shape == (1, 8, 8, 8)
    assert info["p"].static_shape == (1, 8, 1, 1)
    assert info["y"].static_shape == (1, 8)
    assert info["W"].static_shape == (8, 3, 3, 3)
    assert info["c"].dtype == np.float32


def test_infer_tensor_info_uses_the_given_batch() -> None:
    model = parse(CONV_NET)
    info = infer_tensor_info(model, resolve_input_shapes(model, {"x": (5, 3, 16, 16)}))
    assert info["c"].static_shape == (5, 8, 8, 8)
    assert info["y"].static_shape == (5, 8)


def test_infer_tensor_info_survives_an_op_onnx_cannot_infer() -> None:
    model = onnx.parser.parse_model(
        """
        <ir_version: 8, opset_import: ["" : 17, "com.example" : 1]>
        g (float[N,3,16,16] x) => (float y) <float[4,3,1,1] W = {1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0}> {
            c = Conv(x, W)
            r = Relu(c)
            m = com.example.Mystery(r)
            y = Relu(m)
        }
        """
    )
    shapes = resolve_input_shapes(model)
    info = infer_tensor_info(model, shapes)  # must not raise
    assert info["c"].static_shape == (1, 4, 16, 16)
    assert info["r"].static_shape == (1, 4, 16, 16)
    # Nothing is known past the custom op.
    assert "m" not in info or info["m"].static_shape is None
    assert "y" not in info or info["y"].static_shape is None


def test_tensor_info_static_shape_is_none_for_partial_shapes() -> None:
    from rewriter.shapes import TensorInfo

    assert TensorInfo(np.dtype(np.float32), (1, None, 3)).static_shape is None
    assert TensorInfo(None, None).static_shape is None
    assert TensorInfo(None, (2, 3)).static_shape == (2, 3)


def test_infer_tensor_info_falls_back_to_declared_shapes_when_inference_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    model = parse(CONV_NET)

    def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise onnx.shape_inference.InferenceError("[ShapeInferenceError] boom\nsecond line")

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", broken)
    info = infer_tensor_info(model, {"x": (2, 3, 16, 16)})
    assert info["x"].static_shape == (2, 3, 16, 16)  # the resolved input shape, not the declared N
    assert info["W"].static_shape == (8, 3, 3, 3)
    assert "c" not in info


def test_a_missing_shape_is_an_unresolved_shape_and_a_bad_flag_is_not() -> None:
    """The loader defers only what the model lacks (UnresolvedShape); a wrong --input-shape is the user's
    mistake and is raised at once, as a plain InputError."""
    from rewriter.errors import UnresolvedShape

    model = parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 3, H, W] x) => (float[N, 3, H, W] y) { y = Relu (x) }
    """)
    with pytest.raises(UnresolvedShape, match="pass --input-shape x:1x3xHxW"):
        resolve_input_shapes(model, None)
    with pytest.raises(InputError) as bad:
        resolve_input_shapes(model, {"z": (1, 3, 8, 8)})
    assert not isinstance(bad.value, UnresolvedShape)
    assert resolve_input_shapes(model, {"x": (2, 3, 8, 8)}) == {"x": (2, 3, 8, 8)}
