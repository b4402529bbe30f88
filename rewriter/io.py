"""Safe model I/O.

Loading (:func:`load_model`) trusts nothing in the file, and refuses with a one-line :class:`InputError`
naming the problem:

* the model file and every data file must be regular files; they are opened without blocking and checked
  on the open descriptor, so a named pipe or a device is refused, never read;
* external data is read only from inside the model's own folder: no absolute path, no ``..``, no NUL
  byte, no symlink (of the file or of a folder on the way) resolving outside, no byte range past the end
  of the file -- all checked before anything is read or allocated;
* a data file with more than one hard link is refused. A hard link inside the folder to a file outside
  it cannot be told apart from a private file by its path; its link count is the only evidence, so the
  policy is to refuse every shared inode (copy the file to break the link);
* ``max_bytes`` bounds the model file plus every external byte range, checked before reading them;
* every tensor's data must match its declared type and dims exactly (before numpy ever reshapes it);
* the opsets of the ONNX domains must be ones this onnx knows (1 up to the newest it ships); subgraphs
  (If/Loop/Scan bodies) nest at most :data:`MAX_SUBGRAPH_DEPTH` deep -- protobuf itself refuses to
  parse beyond about 30 levels, which is reported as such;
* the main graph is in single-assignment form, every node input is defined, there is no cycle and the
  nodes are in topological order; then the ONNX checker runs.

Saving (:func:`save_model`) never leaves a partial file at the destination. Each file is written to a
temporary file in the destination folder (``.NAME.PID.XXXX.tmp``), flushed to disk, then moved into
place with ``os.replace``: data file first, model last. When an existing model at the destination may
refer to the data file being replaced, that model is first moved aside, so that a reader (or a run killed
half way) finds the old model with its old data, no model, or the new model with its new data -- never
the old model over new data. The files moved aside (``.NAME.PID.XXXX.old``; the old data file is kept by
a hard link) are removed when the save completes; a killed save leaves them for recovery by hand. Stale
temporary files of this pattern whose process is gone are removed by the next save to the same path.
A symbolic link at the destination is replaced by the new file (its target is never written), with a
warning. Neither function modifies its input.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import stat
import tempfile
from collections.abc import Iterable, Iterator
from math import prod
from pathlib import Path
from typing import BinaryIO

import onnx
from google.protobuf.message import DecodeError, EncodeError
from onnx import helper

from rewriter.errors import InputError

log = logging.getLogger(__name__)

#: Protobuf cannot serialize a message of 2 GiB or more.
PROTOBUF_LIMIT = 2**31 - 1
#: Tensors at least this large go to the data file when saving with external data.
EXTERNAL_THRESHOLD = 1024
#: Deepest nesting of subgraphs (If/Loop/Scan bodies) accepted; real models use a handful of levels.
MAX_SUBGRAPH_DEPTH = 16
_ALIGN = 4096
#: Inline tensors larger than this are left out of the copies made for the checker and shape inference.
_STRIP_BYTES = 1 << 20

_ONNX_DOMAINS = {"": onnx.defs.onnx_opset_version(), "ai.onnx": onnx.defs.onnx_opset_version(),
                 "ai.onnx.ml": onnx.defs.onnx_ml_opset_version()}
_DATA_TYPES = {v: k for k, v in onnx.TensorProto.DataType.items() if v != onnx.TensorProto.UNDEFINED}
_STRING = onnx.TensorProto.STRING
#: Element widths in bits of the packed sub-byte types (the rest are a whole numpy itemsize).
_SUB_BYTE_BITS = {"UINT4": 4, "INT4": 4, "FLOAT4E2M1": 4, "UINT2": 2, "INT2": 2, "FLOAT6E2M3": 6, "FLOAT6E3M2": 6}
_COMPLEX = {onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128}


# -- reading files ---------------------------------------------------------------------------------------
def _open_regular(path: str | os.PathLike[str], what: str, *, follow: bool = True) -> BinaryIO:
    """Open a regular file for reading; refuse pipes, devices, sockets and folders without blocking on them.

    ``follow=False`` also refuses a symlink as the last path component.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    if not follow:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise InputError(f"{what}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{what}: is a directory, not an ONNX model file") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{what}: cannot open: {_first_line(exc)}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise InputError(f"{what}: is a directory, not an ONNX model file")
        if not stat.S_ISREG(st.st_mode):
            raise InputError(f"{what}: not a regular file")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a regular file's bytes (a pipe or device is refused, not read)."""
    digest = hashlib.sha256()
    with _open_regular(path, str(path)) as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# -- walking a model -------------------------------------------------------------------------------------
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


def _model_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    yield from iter_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            yield from _node_tensors(node)


def _subgraph_depth(model: onnx.ModelProto) -> int:
    """Deepest nesting of graph-valued attributes (the main graph is level 0), walked without recursion."""
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


# -- external data ---------------------------------------------------------------------------------------
def _external_info(tensor: onnx.TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def _resolve_external_location(base: Path, tensor: onnx.TensorProto) -> tuple[Path, int, int | None]:
    """Check one external-data reference and return (file, offset, length). Reads nothing."""
    info = _external_info(tensor)
    location = info.get("location", "")
    name = tensor.name or "<unnamed>"
    if not location:
        raise InputError(f"tensor {name!r} is marked external but names no data file")
    if "\0" in location:
        raise InputError(f"tensor {name!r}: external data location {location!r} contains a NUL byte")
    loc = Path(location)
    if loc.is_absolute() or location.startswith(("/", "\\")) or (len(location) > 1 and location[1] == ":"):
        raise InputError(f"tensor {name!r}: external data location {location!r} is an absolute path")
    if any(part == ".." for part in Path(location.replace("\\", "/")).parts):
        raise InputError(f"tensor {name!r}: external data location {location!r} leaves the model's folder")
    target = base / loc
    try:
        real_base = base.resolve()
        real_target = target.resolve(strict=True)
    except (RuntimeError, OSError, ValueError):
        raise InputError(f"tensor {name!r}: external data file {location!r} not found") from None
    if real_base not in real_target.parents:
        raise InputError(f"tensor {name!r}: external data location {location!r} resolves outside the model's folder")
    st = real_target.stat()
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"tensor {name!r}: external data location {location!r} is not a regular file")
    if st.st_nlink > 1:
        raise InputError(
            f"tensor {name!r}: external data file {location!r} has {st.st_nlink} hard links; a hard link may lead "
            "outside the model's folder, so shared files are refused (copy it to break the link)"
        )
    try:
        offset = int(info.get("offset", "0"))
        length = int(info["length"]) if "length" in info else None
    except ValueError:
        raise InputError(f"tensor {name!r}: external data offset/length are not integers") from None
    if offset < 0 or (length is not None and length < 0):
        raise InputError(f"tensor {name!r}: negative external data offset or length")
    size = st.st_size
    end = offset + (length if length is not None else 0)
    if offset > size or end > size:
        raise InputError(
            f"tensor {name!r}: external data range [{offset}, {end}) lies beyond the end of {location!r} ({size} bytes)"
        )
    return real_target, offset, length


def _external_refs(model: onnx.ModelProto, base: Path) -> list[tuple[onnx.TensorProto, Path, int, int]]:
    """Every external tensor with its checked (file, offset, length); nothing is read."""
    refs = []
    for tensor in _model_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        _check_declared(tensor)
        target, offset, length = _resolve_external_location(base, tensor)
        if length is None:
            length = target.stat().st_size - offset
        expected = _expected_bytes(tensor)
        if expected is not None and expected != length:
            raise InputError(_size_message(tensor, f"need {expected} bytes", f"its external data range holds {length}"))
        refs.append((tensor, target, offset, length))
    return refs


def _read_external(refs: list[tuple[onnx.TensorProto, Path, int, int]]) -> None:
    """Read each external tensor's bytes into ``raw_data``."""
    for tensor, target, offset, length in refs:
        with _open_regular(target, f"external data file {target.name!r}", follow=False) as fh:
            st = os.fstat(fh.fileno())
            if st.st_nlink > 1 or st.st_size < offset + length:  # changed since it was checked
                raise InputError(f"tensor {tensor.name!r}: external data file {target.name!r} changed while loading")
            fh.seek(offset)
            data = fh.read(length)
        if len(data) != length:
            raise InputError(f"tensor {tensor.name!r}: external data file {target.name!r} changed while loading")
        tensor.raw_data = data
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT


def input_files(path: str | os.PathLike[str]) -> list[Path]:
    """The model file and the (checked) external data files it refers to, reading no tensor data."""
    p = Path(path)
    model = _parse(p, None)
    files = [p]
    for _, target, _, _ in _external_refs(model, p.parent):
        if target not in files:
            files.append(target)
    return files


def check_output_path(source: str | os.PathLike[str], output: str | os.PathLike[str], *, in_place: bool = False) -> None:
    """Refuse an output whose model or data file would replace the input model or one of its data files.

    ``in_place`` allows it (the caller asked to overwrite the input).
    """
    out = Path(output)
    targets = [t for t in (out, out.parent / (out.name + ".data")) if t.exists()]
    if in_place or not targets:
        return
    inputs = input_files(source)
    for target in targets:
        for i, existing in enumerate(inputs):
            if os.path.samefile(target, existing):
                what = "is the input file" if target == out and i == 0 else f"would overwrite the input's {'model' if i == 0 else 'data'} file {existing.name!r}"
                raise InputError(f"{output}: {what}; pass --in-place to overwrite it")


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


def _expected_bytes(tensor: onnx.TensorProto) -> int | None:
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


def _size_message(tensor: onnx.TensorProto, need: str, has: str) -> str:
    name = tensor.name or "<unnamed>"
    return f"tensor {name!r}: declared dims {list(tensor.dims)} of {_type_name(tensor.data_type)} {need}, {has}"


def _check_declared(tensor: onnx.TensorProto) -> None:
    name = tensor.name or "<unnamed>"
    if tensor.data_type not in _DATA_TYPES:
        raise InputError(f"tensor {name!r} has unknown data type {tensor.data_type}")
    if any(d < 0 for d in tensor.dims):
        raise InputError(f"tensor {name!r} has a negative dim in {list(tensor.dims)}")


def _check_tensor(tensor: onnx.TensorProto) -> None:
    """The declared type and dims match the data exactly (numpy_helper would fail or misread otherwise)."""
    _check_declared(tensor)
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
        expected = _expected_bytes(tensor)
        if expected is not None and expected != len(tensor.raw_data):
            raise InputError(_size_message(tensor, f"need {expected} bytes", f"its data has {len(tensor.raw_data)}"))
        return
    expected = _expected_values(tensor)
    if typed != expected:
        raise InputError(_size_message(tensor, f"need {expected} values", f"its data has {typed} values"))


# -- graph structure -------------------------------------------------------------------------------------
def _node_label(node: onnx.NodeProto, index: int) -> str:
    return f"{node.name!r} ({node.op_type})" if node.name else f"#{index} ({node.op_type})"


def _check_opsets(model: onnx.ModelProto) -> None:
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


def _check_limits(model: onnx.ModelProto) -> None:
    depth = _subgraph_depth(model)
    if depth > MAX_SUBGRAPH_DEPTH:
        raise InputError(f"subgraphs nested more than {MAX_SUBGRAPH_DEPTH} deep (If/Loop/Scan bodies); refused")


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


def _checkable(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """The model, or for one over protobuf's limit a copy without its big main-graph initializers.

    Those become typed graph inputs (their data was already checked against their dims). ``None`` when
    even the copy is too large for the checker.
    """
    if _fits_protobuf(model):
        return model
    slim = onnx.ModelProto()
    copy_fields(model, slim, skip=("graph",))
    copy_fields(model.graph, slim.graph, skip=("initializer",))
    listed = {vi.name for vi in model.graph.input}
    for t in model.graph.initializer:
        if len(t.raw_data) <= _STRIP_BYTES:
            slim.graph.initializer.append(t)
        elif t.name not in listed:
            slim.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return slim if _fits_protobuf(slim) else None


def _fits_protobuf(message) -> bool:  # type: ignore[no-untyped-def]
    """Whether ``message`` can be serialized (upb raises instead of answering ByteSize() over 2 GiB)."""
    try:
        return message.ByteSize() < PROTOBUF_LIMIT
    except EncodeError:
        return False


def check_model_structure(model: onnx.ModelProto) -> None:
    """Opsets, nesting, tensor data, the main graph's structure, then the ONNX checker; raise InputError on failure."""
    _check_opsets(model)
    _check_limits(model)
    for tensor in _model_tensors(model):
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
        raise InputError(f"invalid ONNX model: {_first_line(exc)}") from None


# -- loading ---------------------------------------------------------------------------------------------
def _check_text(model: onnx.ModelProto) -> None:
    """Every string field is valid UTF-8 (protobuf parses proto2 strings unchecked; writing one would raise).

    Walks the descriptors without touching bytes fields, so tensor data is not copied.
    """
    stack: list = [model]
    while stack:
        msg = stack.pop()
        for field in msg.DESCRIPTOR.fields:
            repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED
            if field.type == field.TYPE_MESSAGE:
                if repeated:
                    stack.extend(getattr(msg, field.name))
                elif msg.HasField(field.name):
                    stack.append(getattr(msg, field.name))
            elif field.type == field.TYPE_STRING:
                try:
                    value = getattr(msg, field.name)
                    values = list(value) if repeated else [value]
                except UnicodeDecodeError:
                    values = [b""]
                if any(isinstance(v, bytes) for v in values):  # upb hands back bytes it cannot decode
                    raise InputError(f"not an ONNX model: a {msg.DESCRIPTOR.name}.{field.name} is not valid UTF-8 text")


def _parse(p: Path, max_bytes: int | None) -> onnx.ModelProto:
    with _open_regular(p, str(p)) as fh:
        size = os.fstat(fh.fileno()).st_size
        if size == 0:
            raise InputError(f"{p}: empty file")
        if max_bytes is not None and size > max_bytes:
            raise InputError(f"{p}: {size} bytes exceeds the limit of {max_bytes} bytes (--max-model-bytes)")
        if size > PROTOBUF_LIMIT:
            raise InputError(f"{p}: {size} bytes is over protobuf's 2 GiB limit; keep the weights in external data")
        payload = fh.read()
    try:
        model = onnx.ModelProto.FromString(payload)
    except (DecodeError, RuntimeError, ValueError, RecursionError) as exc:
        text = _first_line(exc)
        if "depth" in text.lower() or "recursion" in text.lower() or isinstance(exc, RecursionError):
            raise InputError(f"{p}: not an ONNX model: messages nested too deeply for protobuf to parse (subgraphs nested beyond its recursion limit)") from None
        raise InputError(f"{p}: not an ONNX model (protobuf parse failed: {text})") from None
    try:
        _check_text(model)
    except InputError as exc:
        raise InputError(f"{p}: {exc}") from None
    if not model.HasField("graph") or not model.graph.node:
        raise InputError(f"{p}: not an ONNX model (no graph or no nodes)")
    return model


def one_line(text: str) -> str:
    """``text`` with control characters (newlines included) escaped: names from a model file are untrusted."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def load_model(path: str | os.PathLike[str], *, max_bytes: int | None = None) -> onnx.ModelProto:
    """Load an ONNX model with its external data, refusing anything unsafe or malformed.

    Raises :class:`InputError` (one line, no traceback needed) for a missing file, a directory or other
    non-regular file, an unparsable or structurally invalid model, external data outside the model's
    folder, or more than ``max_bytes`` bytes of model file plus external data.
    """
    p = Path(path)
    try:
        model = _parse(p, max_bytes)
    except InputError as exc:
        raise InputError(one_line(str(exc))) from None
    try:
        _check_opsets(model)
        _check_limits(model)
        refs = _external_refs(model, p.parent)
        if max_bytes is not None and refs:
            total = p.stat().st_size + sum(length for _, _, _, length in refs)
            if total > max_bytes:
                raise InputError(
                    f"{total} bytes of model file and external data exceeds the limit of {max_bytes} bytes (--max-model-bytes)"
                )
        _read_external(refs)
        check_model_structure(model)
    except InputError as exc:
        raise InputError(one_line(f"{p}: {exc}")) from None
    return model


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0].strip() if text else type(exc).__name__


# -- saving ----------------------------------------------------------------------------------------------
def _fsync_write(fh, data: bytes) -> None:  # type: ignore[no-untyped-def]
    fh.write(data)
    fh.flush()
    os.fsync(fh.fileno())


def _tensor_nbytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) for t in _model_tensors(model))


def _umask() -> int:
    """The process umask, read from /proc where possible (setting it to read it races with other threads)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _make_temp(folder: Path, name: str, suffix: str) -> tuple[int, str]:
    """A new file ``.NAME.PID.XXXX<suffix>`` in ``folder``, readable like any new file (not mkstemp's 0600)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.{os.getpid()}.", suffix=suffix, dir=folder)
    os.fchmod(fd, 0o666 & ~_umask())
    return fd, tmp


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _remove_stale_temps(folder: Path, names: Iterable[str]) -> None:
    """Remove ``.NAME.PID.XXXX.tmp`` files left by saves whose process is gone (killed mid-write).

    Safe: only this module's own pattern, only for the names being written, and never a file whose
    process is still running (a concurrent save of the same path keeps its temporary file). Files moved
    aside (``.old``) are reported, never removed: they may be the only copy of an overwritten model.
    """
    patterns = [re.compile(rf"^\.{re.escape(name)}\.(\d+)\.[A-Za-z0-9_]+\.(tmp|old)$") for name in names]
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        for pattern in patterns:
            match = pattern.match(entry.name)
            if match is None or _pid_alive(int(match.group(1))):
                continue
            if match.group(2) == "old":
                log.warning("%s was left by an interrupted save (the model it replaced); not removed", Path(folder, entry.name))
                continue
            try:
                os.unlink(entry.path)
                log.info("removed %s, left by an interrupted save", entry.path)
            except OSError:
                pass


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike[str],
    *,
    external_data: bool | None = None,
) -> Path:
    """Write ``model`` to ``path`` atomically; return the path.

    ``external_data=None`` stores weights in a side file ``<name>.data`` only when the model would
    exceed protobuf's 2 GiB limit. The data file is written fresh (never appended to) and moved into
    place before the model file; see the module docstring for what a reader or a killed run can observe.
    """
    out = Path(path)
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"{out}: output folder {folder} does not exist")
    if out.is_dir():
        raise InputError(f"{out}: is a directory")
    if external_data is None:
        external_data = _tensor_nbytes(model) + 64 * 1024 * 1024 >= PROTOBUF_LIMIT
    data_name = out.name + ".data"
    data_path = folder / data_name
    for link in (out, data_path) if external_data else (out,):
        if link.is_symlink():
            log.warning("%s is a symbolic link; it is replaced by a regular file, its target is left alone", link)
    _remove_stale_temps(folder, (out.name, data_name))
    to_write = model
    temps: list[str] = []
    try:
        if external_data:
            to_write = onnx.ModelProto()
            to_write.CopyFrom(model)
            fd, data_tmp = _make_temp(folder, data_name, ".tmp")
            temps.append(data_tmp)
            with os.fdopen(fd, "wb") as fh:
                offset = 0
                for tensor in _model_tensors(to_write):
                    if not tensor.HasField("raw_data") or len(tensor.raw_data) < EXTERNAL_THRESHOLD:
                        continue
                    pad = (-offset) % _ALIGN
                    fh.write(b"\0" * pad)
                    offset += pad
                    blob = tensor.raw_data
                    fh.write(blob)
                    tensor.ClearField("raw_data")
                    tensor.data_location = onnx.TensorProto.EXTERNAL
                    del tensor.external_data[:]
                    for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(len(blob)))):
                        entry = tensor.external_data.add()
                        entry.key, entry.value = key, value
                    offset += len(blob)
                fh.flush()
                os.fsync(fh.fileno())
        try:
            payload = to_write.SerializeToString()
        except ValueError as exc:  # protobuf refuses messages over 2 GiB
            raise InputError(f"{out}: the model is too large to write without external data ({_first_line(exc)}); use --external-data") from None
        fd, model_tmp = _make_temp(folder, out.name, ".tmp")
        temps.append(model_tmp)
        with os.fdopen(fd, "wb") as fh:
            _fsync_write(fh, payload)
        aside: list[str] = []
        if external_data:
            if os.path.lexists(out) and data_path.exists():
                # The old model may refer to the data file about to be replaced: move it aside (and keep
                # the old data by a hard link) until the new model is in place, so that nobody ever sees
                # the old model over new data.
                aside += _set_aside(out, data_path, folder)
            os.replace(temps[0], data_path)
            temps.pop(0)
        os.replace(model_tmp, out)
        temps.remove(model_tmp)
        _fsync_dir(folder)
        for leftover in aside:
            os.unlink(leftover)
    finally:
        for tmp in temps:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return out


def _aside_name(folder: Path, name: str) -> str:
    return str(folder / f".{name}.{os.getpid()}.{secrets.token_hex(8)}.old")


def _set_aside(model_path: Path, data_path: Path, folder: Path) -> list[str]:
    """Keep the old data file under a hidden name (hard link) and move the old model there too."""
    kept = []
    old_data = _aside_name(folder, data_path.name)
    try:
        os.link(data_path, old_data)
        kept.append(old_data)
    except OSError:  # no hard links here: the old data cannot be kept, the old model is still moved
        log.info("cannot keep %s aside while saving (no hard links on this file system)", data_path)
    old_model = _aside_name(folder, model_path.name)
    os.replace(model_path, old_model)
    kept.append(old_model)
    return kept


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A deep copy, so that callers' in-memory models are never modified."""
    clone = onnx.ModelProto()
    clone.CopyFrom(model)
    return clone
