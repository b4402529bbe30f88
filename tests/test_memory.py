"""What keeps a run's memory down: a big model reaches onnxruntime through a file (the serialized copy freed
before the session is built), counting parameters loads no weight, released graph views are rebuilt on demand."""

from __future__ import annotations

import os

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from rewriter.analysis import analyze
from rewriter.memory import give_back_memory
from rewriter.model import Model
from rewriter.validation import runtime
from rewriter.validation.runtime import payload, reference_session, run_feeds
from tests.helpers import parse

CONV = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1, 3, 8, 8] X) => (float[1, 4, 8, 8] Y)
    <float[4, 3, 3, 3] W, float[4] B> {
        Y = Conv <pads = [1, 1, 1, 1]> (X, W, B)
    }
"""


def test_a_small_model_goes_as_bytes_and_a_big_one_through_a_file_that_is_removed(monkeypatch: pytest.MonkeyPatch) -> None:
    proto = parse(CONV)
    with payload(proto) as source:
        assert isinstance(source, bytes)
    monkeypatch.setattr(runtime, "FILE_PAYLOAD_BYTES", 0)
    with payload(proto) as source:
        assert isinstance(source, str) and os.path.isfile(source)
        path = source
    assert not os.path.exists(path)
    x = np.ones((1, 3, 8, 8), np.float32)
    (out,) = run_feeds(reference_session(proto), [{"X": x}])  # built from the file, the same outputs
    with payload(proto) as source:
        assert source.endswith(".onnx")
    assert out["Y"].shape == (1, 4, 8, 8)
    give_back_memory()  # never raises, glibc or not


def test_counting_parameters_loads_no_weight_and_a_released_view_is_rebuilt() -> None:
    model = Model.from_source(parse(CONV))
    analysis = analyze(model)
    assert analysis.total_params == 4 * 3 * 3 * 3 + 4
    lazy = [t for t in model.graph.tensors().values() if isinstance(t, gs.Constant)]
    assert lazy and all(type(t._values).__name__ == "LazyValues" for t in lazy)  # shapes and dtypes only
    first = model.graph
    model.release()
    assert model.graph is not first and model.node(first.nodes[0].name) is not None
