"""Fuzzing the loader and what runs right after it: the only exception a user may see is InputError.

Two targets, both with hypothesis:

* raw bytes written to a model file -> ``Model.from_source(path)``;
* valid models (the hostile suite's base conv net, one with BatchNormalization, one with an If, one whose
  weight lives in an external data file) mutated at the protobuf level -- dims, data types, raw data,
  external-data entries, attributes, opsets, IR version, node wiring, op types, input shapes -- or at
  the byte level (flips, inserts, deletes), then loaded, analyzed and run through ``fuse_1x1_chain``
  (unguarded ``apply_pass``).

Either the model is used, or :class:`~rewriter.errors.InputError` is raised; any other exception type is a
bug. ``make test`` runs the default profile (a few hundred examples per target); ``make fuzz-io`` runs the
``fuzz`` profile (10,000 per target).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from rewriter.analysis import analyze
from rewriter.errors import InputError
from rewriter.model import Model
from rewriter.pipeline import apply_pass
from tests.hostile import base_model, if_model

SETTINGS = settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], deadline=None)


def _bn_model() -> onnx.ModelProto:
    """x -> Conv 1x1 -> BatchNormalization -> Conv 1x1 -> y: fuse_1x1_chain looks through the BN."""
    model = base_model(seed=1)
    rng = np.random.default_rng(1)
    params = {"s": 1 + 0.1 * rng.standard_normal(8), "t": 0.1 * rng.standard_normal(8),
              "mean": 0.1 * rng.standard_normal(8), "var": 0.5 + rng.random(8)}
    model.graph.initializer.extend(numpy_helper.from_array(v.astype(np.float32), k) for k, v in params.items())
    conv2 = model.graph.node[1]
    model.graph.node.insert(1, helper.make_node("BatchNormalization", ["a", "s", "t", "mean", "var"], ["a_bn"], epsilon=1e-5))
    conv2.input[0] = "a_bn"
    onnx.checker.check_model(model, full_check=True)
    return model


def _external_model() -> tuple[onnx.ModelProto, bytes]:
    """The base model with W1 in the data file ``w.data``; returns the model and the data file's bytes."""
    model = base_model(seed=2)
    w1 = next(t for t in model.graph.initializer if t.name == "W1")
    blob = w1.raw_data
    w1.ClearField("raw_data")
    w1.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "w.data"), ("offset", "0"), ("length", str(len(blob)))):
        entry = w1.external_data.add()
        entry.key, entry.value = key, value
    return model, blob


_EXTERNAL, _DATA = _external_model()
SEEDS = [base_model(), _bn_model(), if_model(), _EXTERNAL]
DATA_FILE = "w.data"

LOCATIONS = ["w.data", "../w.data", "/etc/passwd", "C:\\w.data", "", "w.data\0x", "sub/../w.data", ".", "w.data/..",
             "nowhere.data", "m.onnx", "\\\\server\\share\\w"]
BIG_INTS = st.sampled_from([0, 1, -1, 2, 3, 7, 8, 2**31 - 1, 2**31, 2**32, 2**62, 2**63 - 1, -(2**63)])
SMALL_INTS = st.integers(min_value=-3, max_value=16)
INTS = st.one_of(SMALL_INTS, BIG_INTS)
OP_TYPES = ["Conv", "Relu", "Add", "If", "Loop", "Scan", "Gemm", "MatMul", "BatchNormalization", "Identity", "Constant",
            "Reshape", "Concat", "Foo", ""]


def _tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    out = list(model.graph.initializer)
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                out.append(attr.t)
            if attr.HasField("g"):
                out.extend(attr.g.initializer)
    return out


def _names(model: onnx.ModelProto) -> list[str]:
    names = {vi.name for vi in model.graph.input} | {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        names.update(node.input)
        names.update(node.output)
    return sorted(names) + ["ghost", ""]


@st.composite
def mutation(draw, model: onnx.ModelProto) -> None:  # type: ignore[no-untyped-def]
    """Apply one drawn protobuf-level mutation to ``model`` in place."""
    kind = draw(st.sampled_from(["dims", "data_type", "raw_data", "external", "attribute", "opset", "ir_version",
                                 "wiring", "op_type", "input_shape", "drop_node", "duplicate_node", "output"]))
    tensors = _tensors(model)
    nodes = list(model.graph.node)
    if kind in ("dims", "data_type", "raw_data", "external") and tensors:
        t = draw(st.sampled_from(tensors))
        if kind == "dims":
            del t.dims[:]
            t.dims.extend(draw(st.lists(INTS, max_size=5)))
        elif kind == "data_type":
            t.data_type = draw(st.integers(min_value=-2, max_value=40))
        elif kind == "raw_data":
            data = t.raw_data
            cut = draw(st.integers(min_value=0, max_value=len(data) + 8))
            t.raw_data = data[:cut] + draw(st.binary(max_size=8))
        else:
            t.data_location = draw(st.sampled_from([TensorProto.EXTERNAL, TensorProto.DEFAULT]))
            del t.external_data[:]
            for key in draw(st.lists(st.sampled_from(["location", "offset", "length", "checksum", "x"]), max_size=4)):
                entry = t.external_data.add()
                entry.key = key
                entry.value = draw(st.sampled_from(LOCATIONS)) if key == "location" else str(draw(INTS))
            if draw(st.booleans()):
                t.ClearField("raw_data")
    elif kind == "attribute" and nodes:
        node = draw(st.sampled_from(nodes))
        name = draw(st.sampled_from(["group", "strides", "pads", "kernel_shape", "dilations", "epsilon", "axis",
                                     "auto_pad", "then_branch", "transB"]))
        for i in reversed(range(len(node.attribute))):
            if node.attribute[i].name == name:
                del node.attribute[i]
        value = draw(st.one_of(INTS, st.lists(INTS, max_size=6), st.floats(allow_nan=True), st.sampled_from(["SAME_UPPER", "X", ""])))
        if not (isinstance(value, list) and not value):
            node.attribute.append(helper.make_attribute(name, value))
    elif kind == "opset":
        entry = draw(st.sampled_from(list(model.opset_import)))
        entry.version = draw(INTS)
        if draw(st.booleans()):
            entry.domain = draw(st.sampled_from(["", "ai.onnx", "ai.onnx.ml", "com.example"]))
    elif kind == "ir_version":
        model.ir_version = draw(st.integers(min_value=-1, max_value=20))
    elif kind == "wiring" and nodes:
        node = draw(st.sampled_from(nodes))
        ports = node.input if draw(st.booleans()) or not node.output else node.output
        if len(ports):
            ports[draw(st.integers(0, len(ports) - 1))] = draw(st.sampled_from(_names(model)))
    elif kind == "op_type" and nodes:
        draw(st.sampled_from(nodes)).op_type = draw(st.sampled_from(OP_TYPES))
    elif kind == "input_shape":
        vi = draw(st.sampled_from(list(model.graph.input)))
        shape = vi.type.tensor_type.shape
        del shape.dim[:]
        for d in draw(st.lists(st.one_of(INTS, st.sampled_from(["N", "H", ""])), max_size=5)):
            dim = shape.dim.add()
            if isinstance(d, str):
                dim.dim_param = d
            else:
                dim.dim_value = d
    elif kind == "drop_node" and len(nodes) > 1:
        del model.graph.node[draw(st.integers(0, len(nodes) - 1))]
    elif kind == "duplicate_node" and nodes:
        model.graph.node.append(draw(st.sampled_from(nodes)))
    elif kind == "output":
        vi = model.graph.output[0]
        vi.name = draw(st.sampled_from(_names(model)))


@st.composite
def mutated_model(draw) -> bytes:  # type: ignore[no-untyped-def]
    """A seed model serialized after protobuf-level mutations, byte-level mutations, or both."""
    model = onnx.ModelProto()
    model.CopyFrom(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(min_value=0, max_value=3))):
        draw(mutation(model))
    data = bytearray(model.SerializeToString())
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "set"]))
        pos = draw(st.integers(min_value=0, max_value=max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and data:
            del data[pos : pos + draw(st.integers(1, 16))]
        elif data:
            data[pos] = draw(st.sampled_from([0x00, 0x08, 0x0A, 0x12, 0x3A, 0x7F, 0x80, 0xFF]))
    return bytes(data)


def _load_or_refuse(payload: bytes, *, full: bool) -> str:
    """Write ``payload`` as a model (next to a valid data file) and use it; only InputError may escape.

    Returns what happened, for hypothesis' statistics.
    """
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "m.onnx"
        path.write_bytes(payload)
        (Path(folder) / DATA_FILE).write_bytes(_DATA)
        try:
            model = Model.from_source(path)
            if full:
                analyze(model)
                result = apply_pass(model, "fuse_1x1_chain")
                return f"used, {len(result.applied)} rewrite(s)"
            return "used"
        except InputError as exc:
            message = str(exc)
            assert message and "\n" not in message, repr(message)
            return "refused: " + message.replace(f"{path}: ", "")[:40]


@SETTINGS
@given(st.binary(max_size=2048))
def test_raw_bytes_load_or_raise_input_error(payload: bytes) -> None:
    event(_load_or_refuse(payload, full=False))


@SETTINGS
@given(mutated_model())
def test_mutated_models_load_analyze_and_rewrite_or_raise_input_error(payload: bytes) -> None:
    event(_load_or_refuse(payload, full=True))


def test_the_seeds_themselves_are_used_without_error() -> None:
    for seed in SEEDS:
        assert _load_or_refuse(seed.SerializeToString(), full=True) == "used, 1 rewrite(s)"
