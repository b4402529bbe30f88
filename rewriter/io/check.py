"""Structural checks of an ONNX model, before anything computes with it.

:func:`check_model_structure` raises a one-line :class:`InputError` naming the first problem found:

* the opsets of the ONNX domains must be ones this onnx knows (1 up to the newest it ships), each domain
  imported once; subgraphs (If/Loop/Scan bodies) nest at most :data:`MAX_SUBGRAPH_DEPTH` deep;
* every tensor's data must match its declared type and dims exactly (before numpy ever reshapes it): a
  tensor of ``prod(dims)`` elements of ``b`` bits holds ``ceil(prod(dims) * b / 8)`` raw bytes, or
  ``prod(dims)`` typed values (twice that for complex types, ``ceil(prod(dims) * b / 8)`` packed values
  for 2- and 4-bit types);
* the main graph is in single-assignment form, every node input is defined, there is no cycle and the
  nodes are in topological order; element types are known ones; Conv/ConvTranspose attributes fit the
  weight; then the ONNX checker runs (on a copy without the big weights when the model is over
  protobuf's 2 GiB limit).

The model is never modified.
"""

from __future__ import annotations

import logging
from math import prod

import onnx
from onnx import helper

from rewriter.errors import InputError
from rewriter.io.proto import MAX_SUBGRAPH_DEPTH, copy_fields, fits_protobuf, model_tensors, subgraph_depth
from rewriter.io.text import first_line, one_line

log = logging.getLogger(__name__)

#: Inline tensors larger than this are left out of the copies made for the checker and shape inference.
_STRIP_BYTES = 1 << 20

_ONNX_DOMAINS = {"": onnx.defs.onnx_opset_version(), "ai.onnx": onnx.defs.onnx_opset_version(),
                 "ai.onnx.ml": onnx.defs.onnx_ml_opset_version()}
_DATA_TYPES = {v: k for k, v in onnx.TensorProto.DataType.items() if v != onnx.TensorProto.UNDEFINED}
_STRING = onnx.TensorProto.STRING
#: Element widths in bits of the packed sub-byte types (the rest are a whole numpy itemsize).
_SUB_BYTE_BITS = {"UINT4": 4, "INT4": 4, "FLOAT4E2M1": 4, "UINT2": 2, "INT2": 2, "FLOAT6E2M3": 6, "FLOAT6E3M2": 6}
_COMPLEX = {onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128}


# -- tensor data -----------------------------------------------------------------------------------------
def _type_name(data_type: int) -> str:
    return _DATA_TYPES.get(data_type, str(data_type))


def _bits(data_type: int) -> int | None:
    name = _DATA_TYPES.get(data_type)
    if name is None or data_type == _STRING:
        return None
    if name in _SUB_BYTE_BITS:
        return _SUB_BYTE_BITS[name]
    try:
        return int(helper.tensor_dtype_to_np_dtype(data_type).itemsize) * 8
    except (KeyError, TypeError, ValueError):
        return None


def _elements(tensor: onnx.TensorProto) -> int:
    return prod(int(d) for d in tensor.dims)


def expected_bytes(tensor: onnx.TensorProto) -> int | None:
    """Raw bytes the declared type and dims need, ``ceil(prod(dims) * bits / 8)``; ``None`` for STRING or an unknown width."""
    bits = _bits(tensor.data_type)
    return None if bits is None else -(-_elements(tensor) * bits // 8)


def _expected_values(tensor: onnx.TensorProto) -> int:
    """How many entries the typed ``*_data`` fields hold for the declared dims."""
    n = _elements(tensor)
    name = _DATA_TYPES.get(tensor.data_type, "")
    if tensor.data_type in _COMPLEX:
        return 2 * n
    if _SUB_BYTE_BITS.get(name) in (2, 4):
        per_value = 8 // _SUB_BYTE_BITS[name]
        return -(-n // per_value)
    return n


def size_message(tensor: onnx.TensorProto, need: str, has: str) -> str:
    """The refusal of a tensor whose data does not fit its declared dims and type."""
    name = tensor.name or "<unnamed>"
    return f"tensor {name!r}: declared dims {list(tensor.dims)} of {_type_name(tensor.data_type)} {need}, {has}"


def check_declared(tensor: onnx.TensorProto) -> None:
    """A known data type and no negative dim (checked before any size is computed from them)."""
    name = tensor.name or "<unnamed>"
    if tensor.data_type not in _DATA_TYPES:
        raise InputError(f"tensor {name!r} has unknown data type {tensor.data_type}")
    if any(d < 0 for d in tensor.dims):
        raise InputError(f"tensor {name!r} has a negative dim in {list(tensor.dims)}")


def _check_tensor(tensor: onnx.TensorProto) -> None:
    """The declared type and dims match the data exactly (numpy_helper would fail or misread otherwise)."""
    check_declared(tensor)
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        return
    name = tensor.name or "<unnamed>"
    typed = (len(tensor.float_data) + len(tensor.int32_data) + len(tensor.string_data) + len(tensor.int64_data)
             + len(tensor.double_data) + len(tensor.uint64_data))
    if tensor.HasField("raw_data"):
        if tensor.data_type == _STRING:
            raise InputError(f"tensor {name!r}: a STRING tensor cannot store raw_data")
        if typed:
            raise InputError(f"tensor {name!r} stores its values twice (raw_data and a typed field)")
        expected = expected_bytes(tensor)
        if expected is not None and expected != len(tensor.raw_data):
            raise InputError(size_message(tensor, f"need {expected} bytes", f"its data has {len(tensor.raw_data)}"))
        return
    expected = _expected_values(tensor)
    if typed != expected:
        raise InputError(size_message(tensor, f"need {expected} values", f"its data has {typed} values"))


# -- graph structure -------------------------------------------------------------------------------------
def _node_label(node: onnx.NodeProto, index: int) -> str:
    return f"{node.name!r} ({node.op_type})" if node.name else f"#{index} ({node.op_type})"


def check_opsets(model: onnx.ModelProto) -> None:
    """Each domain imported once; ONNX domains at an opset this onnx knows (1 to its newest)."""
    seen: set[str] = set()
    for entry in model.opset_import:
        domain = entry.domain
        key = "" if domain == "ai.onnx" else domain
        if key in seen:
            raise InputError(f"model imports domain {domain or 'ai.onnx'!r} more than once")
        seen.add(key)
        newest = _ONNX_DOMAINS.get(domain)
        if newest is None:
            continue
        if not 1 <= entry.version <= newest:
            raise InputError(
                f"model imports opset {entry.version} of {domain or 'ai.onnx'!r}; "
                f"onnx {onnx.__version__} supports opsets 1 to {newest}"
            )


def _check_graph(graph: onnx.GraphProto) -> None:
    """Single assignment, defined inputs, no cycle, topological order (the main graph; the checker does the rest)."""
    initializers: set[str] = set()
    for t in graph.initializer:
        if t.name in initializers:
            raise InputError(f"initializer name {t.name!r} is used more than once")
        initializers.add(t.name)
    inputs: set[str] = set()
    for vi in graph.input:
        if vi.name in inputs:
            raise InputError(f"graph input name {vi.name!r} is used more than once")
        inputs.add(vi.name)
    defined = initializers | inputs
    producer: dict[str, int] = {}
    for i, node in enumerate(graph.node):
        for out in node.output:
            if not out:
                continue
            if out in producer:
                first = graph.node[producer[out]]
                raise InputError(
                    f"tensor {out!r} is produced by more than one node ({_node_label(first, producer[out])} and {_node_label(node, i)})"
                )
            if out in defined:
                kind = "an initializer" if out in initializers else "a graph input"
                raise InputError(f"node {_node_label(node, i)} writes tensor {out!r}, which is already {kind}")
            producer[out] = i
    for i, node in enumerate(graph.node):
        for name in node.input:
            if name and name not in defined and name not in producer:
                raise InputError(
                    f"node {_node_label(node, i)} reads tensor {name!r}, which nothing defines "
                    "(no node output, graph input or initializer)"
                )
    # Kahn's algorithm over explicit inputs: whatever cannot be ordered lies on or behind a cycle.
    users: dict[int, list[int]] = {i: [] for i in range(len(graph.node))}
    pending = [0] * len(graph.node)
    for i, node in enumerate(graph.node):
        for src in {producer[name] for name in node.input if name in producer}:
            users[src].append(i)
            pending[i] += 1
    ready = [i for i, n in enumerate(pending) if n == 0]
    done = 0
    while ready:
        i = ready.pop()
        done += 1
        for j in users[i]:
            pending[j] -= 1
            if pending[j] == 0:
                ready.append(j)
    if done < len(graph.node):
        stuck = [i for i, n in enumerate(pending) if n > 0]
        labels = ", ".join(_node_label(graph.node[i], i) for i in stuck[:4]) + (", ..." if len(stuck) > 4 else "")
        raise InputError(f"graph has a cycle (nodes that cannot be ordered: {labels})")
    for i, node in enumerate(graph.node):
        for name in node.input:
            if name in producer and producer[name] > i:
                later = graph.node[producer[name]]
                raise InputError(
                    f"nodes are not in topological order: node {_node_label(node, i)} reads {name!r} before "
                    f"node {_node_label(later, producer[name])} produces it"
                )


def _check_conv_attributes(graph: onnx.GraphProto) -> None:
    """Conv/ConvTranspose attributes the checker leaves alone but analysis and passes compute with.

    group >= 1 and dividing the weight's channels, positive kernel/strides/dilations, non-negative pads,
    lengths matching the weight's spatial rank (onnxruntime refuses the rest when it builds a session).
    """
    weights = {t.name: list(t.dims) for t in graph.initializer}
    for i, node in enumerate(graph.node):
        if node.op_type not in ("Conv", "ConvTranspose") or node.domain not in ("", "ai.onnx"):
            continue
        label = f"node {_node_label(node, i)}"
        attrs = {a.name: a for a in node.attribute}
        group = attrs["group"].i if "group" in attrs else 1
        if ("group" in attrs and attrs["group"].type != onnx.AttributeProto.INT) or group < 1:
            raise InputError(f"{label}: group must be a positive integer")
        w = weights.get(node.input[1]) if len(node.input) > 1 else None
        spatial = len(w) - 2 if w is not None else None
        if w is not None and (spatial < 1 or w[0] % group):  # type: ignore[operator]
            raise InputError(f"{label}: weight dims {w} do not fit group {group}")
        for name, low, per_axis in (("kernel_shape", 1, 1), ("strides", 1, 1), ("dilations", 1, 1), ("pads", 0, 2),
                                    ("output_padding", 0, 1)):
            if name not in attrs:
                continue
            values = list(attrs[name].ints)
            if attrs[name].type != onnx.AttributeProto.INTS or any(v < low for v in values):
                raise InputError(f"{label}: {name} must be integers >= {low}, got {values}")
            if spatial is not None and len(values) != per_axis * spatial:
                raise InputError(f"{label}: {name} {values} does not match the weight's {spatial} spatial dims")
        if w is not None and "kernel_shape" in attrs and list(attrs["kernel_shape"].ints) != w[2:]:
            raise InputError(f"{label}: kernel_shape {list(attrs['kernel_shape'].ints)} differs from the weight's {w[2:]}")
        bias = weights.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if w is not None and bias is not None:
            out_channels = w[0] if node.op_type == "Conv" else w[1] * group
            if bias != [out_channels]:
                raise InputError(f"{label}: bias dims {bias} do not match the {out_channels} output channels of weight {w}")


def _check_value_types(graph: onnx.GraphProto) -> None:
    """Element types of the main graph's inputs, outputs and value_info are known ones (0: unset)."""
    for where, values in (("input", graph.input), ("output", graph.output), ("value_info", graph.value_info)):
        for vi in values:
            stack = [vi.type]
            while stack:
                t = stack.pop()
                kind = t.WhichOneof("value")
                if kind in ("tensor_type", "sparse_tensor_type"):
                    elem = getattr(t, kind).elem_type
                    if elem and elem not in _DATA_TYPES:
                        raise InputError(f"graph {where} {one_line(repr(vi.name))} has unknown element type {elem}")
                elif kind in ("sequence_type", "optional_type"):
                    stack.append(getattr(t, kind).elem_type)
                elif kind == "map_type":
                    stack.append(t.map_type.value_type)


def check_limits(model: onnx.ModelProto) -> None:
    """Subgraphs nested at most :data:`MAX_SUBGRAPH_DEPTH` deep."""
    depth = subgraph_depth(model)
    if depth > MAX_SUBGRAPH_DEPTH:
        raise InputError(f"subgraphs nested more than {MAX_SUBGRAPH_DEPTH} deep (If/Loop/Scan bodies); refused")


def _big(tensor: onnx.TensorProto) -> bool:
    """Whether ``tensor`` is left out of the checker's copy (over :data:`_STRIP_BYTES`, or past protobuf's limit,
    where upb raises rather than answer its size)."""
    return not fits_protobuf(tensor) or tensor.ByteSize() > _STRIP_BYTES


def _checkable(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """The model, or -- where it has big main-graph initializers -- a copy without them.

    Those become typed graph inputs (their data was already checked against their dims). The checker
    serializes what it is given, and a model over protobuf's limit cannot be: the copy is checked in both
    cases (a 100 MB model's serialization and size cost half a second; its copy's, nothing). ``None`` when
    even the copy is too large for the checker.
    """
    if not any(_big(t) for t in model.graph.initializer):
        return model if fits_protobuf(model) else None
    slim = onnx.ModelProto()
    copy_fields(model, slim, skip=("graph",))
    copy_fields(model.graph, slim.graph, skip=("initializer",))
    listed = {vi.name for vi in model.graph.input}
    for t in model.graph.initializer:
        if len(t.raw_data) <= _STRIP_BYTES:
            slim.graph.initializer.append(t)
        elif t.name not in listed:
            slim.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return slim if fits_protobuf(slim) else None


def check_model_structure(model: onnx.ModelProto) -> None:
    """Opsets, nesting, tensor data, the main graph's structure, then the ONNX checker; raise InputError on failure."""
    check_opsets(model)
    check_limits(model)
    for tensor in model_tensors(model):
        _check_tensor(tensor)
    _check_graph(model.graph)
    _check_value_types(model.graph)
    _check_conv_attributes(model.graph)
    checkable = _checkable(model)
    if checkable is None:
        log.info("model too large for the ONNX checker even without its big weights; structure checks only")
        return
    try:
        onnx.checker.check_model(checkable)
    except (onnx.checker.ValidationError, ValueError, RuntimeError) as exc:
        raise InputError(f"invalid ONNX model: {first_line(exc)}") from None
