"""Small ONNX models and files shared by the io tests (tests/test_io_load.py, tests/test_io_save.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


# 16*3*3*3 float32 = 1728 bytes: over EXTERNAL_THRESHOLD, so it goes to the data file; the bias stays inline.
W_SHAPE = (16, 3, 3, 3)


def conv_model(seed: int = 0) -> onnx.ModelProto:
    """x[1,3,8,8] -> Conv(W, B) -> Relu -> y, with unnamed nodes (so naming them would show as a change)."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.standard_normal(W_SHAPE).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "B")
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16, 8, 8])],
        [w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def tensors_by_name(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def write_with_external_weight(
    model_path: Path, data_path: Path, location: str, *, offset: int = 0, length: int | None = None
) -> None:
    """Write ``conv_model()`` with W's bytes in ``data_path``, referenced by the entry ``location``."""
    model = conv_model()
    weight = next(t for t in model.graph.initializer if t.name == "W")
    blob = weight.raw_data
    data_path.parent.mkdir(parents=True, exist_ok=True)
    data_path.write_bytes(blob)
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    entries = {"location": location, "offset": str(offset), "length": str(len(blob) if length is None else length)}
    for key, value in entries.items():
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    model_path.parent.mkdir(parents=True, exist_ok=True)
    model_path.write_bytes(model.SerializeToString())


def run(model_or_path, x: np.ndarray) -> np.ndarray:  # type: ignore[no-untyped-def]
    payload = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path)
    sess = ort.InferenceSession(payload, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]
