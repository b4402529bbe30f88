"""Model versions: forks do not touch their parent; the model's interface survives a commit."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from passes.fuse_1x1_chain import Fuse1x1Chain
from rewriter.model import Model, name_nodes
from rewriter.pipeline import apply_pass


def _chain_with_overridable_weight() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((16, 4, 1, 1)).astype(np.float32), "W1")
    w2 = numpy_helper.from_array(rng.standard_normal((2, 16, 1, 1)).astype(np.float32), "W2")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["X", "W1"], ["A"], name="a"), helper.make_node("Conv", ["A", "W2"], ["Y"], name="b")],
        "g",
        [helper.make_tensor_value_info("X", 1, [1, 4, 3, 3]), helper.make_tensor_value_info("W1", 1, [16, 4, 1, 1])],
        [helper.make_tensor_value_info("Y", 1, [1, 2, 3, 3])],
        [w1, w2],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_initializer_listed_as_input_is_overridable_not_constant() -> None:
    """IR >= 4: an initializer that is also a graph input is a default value the caller may replace."""
    model = _chain_with_overridable_weight()
    result = apply_pass(model, Fuse1x1Chain())
    assert not result.modified
    assert any("graph input" in s.reason for s in result.skipped)
    committed = Model.from_source(model).fork().commit()
    assert [i.name for i in committed.proto.graph.input] == ["X", "W1"]


def test_fork_leaves_parent_untouched(sample_model: onnx.ModelProto) -> None:
    parent = Model.from_source(sample_model)
    before = parent.proto.SerializeToString()
    child = parent.fork()
    child.graph.nodes.pop()
    child.commit()
    assert parent.proto.SerializeToString() == before
    assert len(parent.graph.nodes) == len(sample_model.graph.node)


def test_name_nodes_makes_unique_names() -> None:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["X"], ["A"]), helper.make_node("Relu", ["A"], ["B"], name="r"),
         helper.make_node("Relu", ["B"], ["Y"], name="r")],
        "g", [helper.make_tensor_value_info("X", 1, [2])], [helper.make_tensor_value_info("Y", 1, [2])],
    )
    model = name_nodes(helper.make_model(graph))
    names = [n.name for n in model.graph.node]
    assert len(set(names)) == 3 and all(names)


def test_the_model_carries_no_calibration_service() -> None:
    """Calibration is handed to data-aware passes (``Pass.use_calibration``), never reached through the model."""
    model = Model.from_source(_chain_with_overridable_weight())
    fork = model.fork()
    assert not any(hasattr(m, "calibration") for m in (model, fork, fork.commit()))
