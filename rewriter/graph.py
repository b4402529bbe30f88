"""Small graph helpers over onnx-graphsurgeon.

Passes use these to ask questions of a graph (is this weight a constant? does this tensor have one
consumer?) and to edit it. Dead-node removal and topological sorting happen in one place only:
:func:`finalize`, called by the pipeline after a rewrite.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper


def const_value(tensor: gs.Tensor | None) -> np.ndarray | None:
    """The value of a tensor known at load time: an initializer or a ``Constant`` node's output.

    Returns ``None`` for anything computed at run time or fed by the user.
    """
    if tensor is None:
        return None
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    if len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
        attrs = tensor.inputs[0].attrs
        if "value" in attrs:
            value = attrs["value"]
            return np.asarray(value.values if isinstance(value, gs.Constant) else value)
        for key, dtype in (("value_float", np.float32), ("value_int", np.int64)):
            if key in attrs:
                return np.asarray(attrs[key], dtype=dtype)
        for key, dtype in (("value_floats", np.float32), ("value_ints", np.int64)):
            if key in attrs:
                return np.asarray(list(attrs[key]), dtype=dtype)
    return None


def const_info(tensor: gs.Tensor) -> tuple[np.dtype, tuple[int, ...]] | None:
    """The dtype and shape of a load-time constant, read without loading its values where onnx-graphsurgeon
    holds them lazily (analysing a model then copies none of its weights); ``None`` for anything computed at
    run time or fed by the user."""
    lazy = tensor if isinstance(tensor, gs.Constant) else None
    if lazy is None and len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
        value = tensor.inputs[0].attrs.get("value")
        lazy = value if isinstance(value, gs.Constant) else None
    if lazy is not None:
        return np.dtype(lazy.dtype), tuple(int(d) for d in lazy.shape)
    v = const_value(tensor)
    return None if v is None else (v.dtype, tuple(int(d) for d in v.shape))


def is_graph_output(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return any(out is tensor or out.name == tensor.name for out in graph.outputs)


def is_graph_input(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return any(inp is tensor or inp.name == tensor.name for inp in graph.inputs)


def single_consumer(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    """True when exactly one node reads ``tensor`` and it is not also a graph output."""
    return len(tensor.outputs) == 1 and not is_graph_output(graph, tensor)


def consumers(tensor: gs.Tensor) -> list[gs.Node]:
    return list(tensor.outputs)


def producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if len(tensor.inputs) == 1 else None


def is_private_constant(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    """A constant read by a single node (so rewriting it cannot change any other node)."""
    return const_value(tensor) is not None and len(tensor.outputs) == 1 and not is_graph_input(graph, tensor)


def dequantized_constant(tensor: gs.Tensor) -> np.ndarray | None:
    """The stored (quantized) value behind ``tensor`` when a DequantizeLinear makes it from a constant --
    an int8 QDQ model's weights and biases -- else ``None``."""
    node = producer(tensor)
    if node is None or node.op != "DequantizeLinear" or not node.inputs:
        return None
    return const_value(node.inputs[0])


#: What a rewrite of a quantized (QDQ) model's weights would need instead.
QUANTIZED_WEIGHTS = "quantized weights (QDQ) are left as they are: rewrite the float model, then quantize it"


def constant_operands_reason(graph: gs.Graph, conv: gs.Node) -> str | None:
    """Why the weight and bias of ``conv`` (any op's inputs after the first) cannot be rewritten: not
    constant, a graph input (overridable), or not floating point; ``None`` when they can."""
    if len(conv.inputs) < 2:
        return f"{conv.name}: conv has no weight input"
    for t in conv.inputs[1:]:
        if not t.name:  # an omitted optional bias
            continue
        if is_graph_input(graph, t):
            return f"{conv.name}: weight or bias {t.name!r} is a graph input, not a constant"
        info = const_info(t)  # (the dtype only: the values are not loaded to be looked at)
        if info is None and dequantized_constant(t) is not None:
            return f"{conv.name}: {QUANTIZED_WEIGHTS}"
        if info is None:
            return f"{conv.name}: weight or bias {t.name!r} is not constant"
        if info[0].kind != "f":
            return f"{conv.name}: weight or bias {t.name!r} is {info[0]}, not floating point"
    return None


def intermediate_reason(graph: gs.Graph, tensor: gs.Tensor) -> str | None:
    """Why the tensor between the two convs cannot disappear (read elsewhere, or a graph output), or None."""
    if is_graph_output(graph, tensor):
        return f"intermediate tensor {tensor.name!r} is a graph output"
    if len(tensor.outputs) != 1:
        return f"intermediate tensor {tensor.name!r} has {len(tensor.outputs)} consumers"
    return None


class NameFactory:
    """Fresh, unique tensor and node names for one graph."""

    def __init__(self, graph: gs.Graph) -> None:
        tensors = graph.tensors()
        self._used = set(tensors) | {n.name for n in graph.nodes if n.name}
        self._counter = itertools.count()

    def __call__(self, base: str) -> str:
        base = base or "t"
        if base not in self._used:
            self._used.add(base)
            return base
        while True:
            name = f"{base}_{next(self._counter)}"
            if name not in self._used:
                self._used.add(name)
                return name


def constant(names: NameFactory, base: str, values: np.ndarray) -> gs.Constant:
    """A new initializer with a fresh name."""
    return gs.Constant(names(base), np.ascontiguousarray(values))


def replace_nodes(
    graph: gs.Graph,
    old: Sequence[gs.Node],
    new: Sequence[gs.Node],
) -> None:
    """Swap a group of nodes for new ones that produce the same output tensors.

    The old nodes are disconnected (their outputs are taken over by ``new``); :func:`finalize` then
    drops them and sorts the graph.
    """
    for node in old:
        node.inputs.clear()
        node.outputs.clear()
    graph.nodes.extend(new)


def finalize(graph: gs.Graph) -> gs.Graph:
    """Remove dead nodes and tensors, then sort topologically. The one place this happens."""
    _drop_unused_nodes(graph)
    return graph.cleanup(remove_unused_graph_inputs=False).toposort()


def _drop_unused_nodes(graph: gs.Graph) -> None:
    """Remove the nodes none of whose outputs is read or a graph output, until there are none: what
    onnx-graphsurgeon's ``cleanup`` removes, without the text of every removed node it formats for its log
    whether or not the log is on (weights printed: ~0.3 s of a PP-OCRv4 det run). Graphs with subgraphs, which
    may read outer tensors without an edge, are left to ``cleanup``."""
    if any(True for n in graph.nodes for _ in n.subgraphs()):
        return
    outputs = {id(t) for t in graph.outputs}
    while True:
        dead = {id(n): n for n in graph.nodes if all(not t.outputs and id(t) not in outputs for t in n.outputs)}
        if not dead:
            return
        for n in dead.values():
            n.inputs.clear()
            n.outputs.clear()
        graph.nodes = [n for n in graph.nodes if id(n) not in dead]


def to_onnx(graph: gs.Graph, template: onnx.ModelProto) -> onnx.ModelProto:
    """Export ``graph`` as a model carrying ``template``'s metadata, opsets and IR version."""
    model = gs.export_onnx(graph, do_type_check=False)
    model.ir_version = template.ir_version
    del model.opset_import[:]
    model.opset_import.extend(template.opset_import)
    model.producer_name = template.producer_name
    model.producer_version = template.producer_version
    model.domain = template.domain
    model.model_version = template.model_version
    model.doc_string = template.doc_string
    del model.metadata_props[:]
    model.metadata_props.extend(template.metadata_props)
    del model.functions[:]
    model.functions.extend(template.functions)
    if model.ir_version < 4:  # IR <= 3 requires every initializer to be listed as a graph input too
        listed = {vi.name for vi in model.graph.input}
        model.graph.input.extend(
            onnx.helper.make_tensor_value_info(t.name, t.data_type, t.dims)
            for t in model.graph.initializer
            if t.name not in listed
        )
    return model


def node_attr(node: gs.Node, name: str, default: Any) -> Any:
    return node.attrs.get(name, default)


def op_histogram(nodes: Iterable[Any]) -> dict[str, int]:
    """Count of nodes per op type, sorted by count then name."""
    counts: dict[str, int] = {}
    for n in nodes:
        op = n.op if isinstance(n, gs.Node) else n.op_type
        counts[op] = counts.get(op, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def tensor_to_array(tensor: onnx.TensorProto) -> np.ndarray:
    return numpy_helper.to_array(tensor)
