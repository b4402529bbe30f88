"""Walking and copying ONNX protobuf messages, and protobuf's limits.

A model's tensors live in the main graph's initializers and sparse initializers, in node attributes
(``t``, ``tensors``, ``sparse_tensor``), in subgraphs (If/Loop/Scan bodies, at any depth) and in the nodes
of model-local functions; :func:`model_tensors` yields every one of them, in a fixed order.
"""

from __future__ import annotations

import math

from collections.abc import Iterable, Iterator

import onnx
from google.protobuf.message import EncodeError

#: Protobuf cannot serialize a message of 2 GiB or more.
PROTOBUF_LIMIT = 2**31 - 1
#: Deepest nesting of subgraphs (If/Loop/Scan bodies) accepted; real models use a handful of levels.
MAX_SUBGRAPH_DEPTH = 16


def iter_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto of a graph: initializers, sparse values and node attributes, subgraphs too."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node: onnx.NodeProto) -> Iterator[onnx.TensorProto]:
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        if attr.HasField("sparse_tensor"):
            yield attr.sparse_tensor.values
            yield attr.sparse_tensor.indices
        if attr.HasField("g"):
            yield from iter_tensors(attr.g)
        for sub in attr.graphs:
            yield from iter_tensors(sub)


def model_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto of a model: its main graph's (see :func:`iter_tensors`), then its functions' nodes'."""
    yield from iter_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            yield from _node_tensors(node)


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the main graph's initializers, from their dims and element types: no tensor data is read (upb's
    ``ByteSize`` serializes the whole model to answer)."""
    total = 0
    for t in model.graph.initializer:
        try:
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        except (KeyError, TypeError, ValueError):  # (an undefined or string type: counted a byte per element)
            itemsize = 1
        total += math.prod(t.dims) * itemsize
    return total


def subgraph_depth(model: onnx.ModelProto) -> int:
    """Deepest nesting of graph-valued attributes (the main graph is level 0), walked without recursion.

    The walk stops once a level deeper than :data:`MAX_SUBGRAPH_DEPTH` is seen (that is enough to refuse).
    """
    deepest = 0
    stack: list[tuple[Iterable[onnx.NodeProto], int]] = [(model.graph.node, 0)]
    stack += [(f.node, 0) for f in model.functions]
    while stack:
        nodes, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth > MAX_SUBGRAPH_DEPTH:
            break
        for node in nodes:
            for attr in node.attribute:
                subs = ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)
                stack += [(sub.node, depth + 1) for sub in subs]
    return deepest


def fits_protobuf(message) -> bool:  # type: ignore[no-untyped-def]
    """Whether ``message`` can be serialized (upb raises instead of answering ByteSize() over 2 GiB)."""
    try:
        return message.ByteSize() < PROTOBUF_LIMIT
    except EncodeError:
        return False


def copy_fields(src, dst, skip: Iterable[str] = ()) -> None:  # type: ignore[no-untyped-def]
    """Copy every set field of protobuf message ``src`` into ``dst`` except those named in ``skip``."""
    for field, value in src.ListFields():
        if field.name in skip:
            continue
        repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED
        if repeated:
            getattr(dst, field.name).extend(value)
        elif field.type == field.TYPE_MESSAGE:
            getattr(dst, field.name).CopyFrom(value)
        else:
            setattr(dst, field.name, value)


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A deep copy, so that callers' in-memory models are never modified."""
    clone = onnx.ModelProto()
    clone.CopyFrom(model)
    return clone
