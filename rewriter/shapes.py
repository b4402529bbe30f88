"""Input-shape resolution and shape inference.

A model's declared input dims may be symbolic. Analysis, validation and the passes need concrete shapes,
so each symbolic dim is resolved from a user override (``NAME:1x3x224x224``) or, for a leading batch dim
only, defaults to 1. The model itself is never changed: the resolved shapes are used for inference on a
private copy.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from rewriter.errors import InputError, UnresolvedShape
from rewriter.io import copy_fields, one_line

log = logging.getLogger(__name__)

Shape = tuple[int, ...]
#: A possibly partial shape: ``None`` for an unknown dim, or ``None`` for unknown rank.
MaybeShape = tuple[int | None, ...] | None


@dataclass(frozen=True)
class TensorInfo:
    """What inference learned about one tensor."""

    dtype: np.dtype | None
    shape: MaybeShape

    @property
    def static_shape(self) -> Shape | None:
        if self.shape is None or any(d is None for d in self.shape):
            return None
        return tuple(int(d) for d in self.shape)  # type: ignore[arg-type]


def parse_input_shape(text: str) -> tuple[str, Shape]:
    """Parse ``NAME:1x3x224x224`` (the name may itself contain ``:``)."""
    name, sep, dims = text.rpartition(":")
    if not sep or not name or not dims:
        raise InputError(f"--input-shape {text!r}: expected NAME:DIMS, e.g. x:1x3x224x224")
    try:
        shape = tuple(int(d) for d in dims.lower().split("x")) if dims != "scalar" else ()
    except ValueError:
        raise InputError(f"--input-shape {text!r}: dims must be integers separated by 'x'") from None
    if any(d <= 0 for d in shape):
        raise InputError(f"--input-shape {text!r}: dims must be positive")
    return name, shape


def parse_input_shapes(texts: Iterable[str]) -> dict[str, Shape]:
    out: dict[str, Shape] = {}
    for text in texts:
        name, shape = parse_input_shape(text)
        out[name] = shape
    return out


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The real inputs: graph inputs that are not initializers."""
    inits = {t.name for t in model.graph.initializer}
    return [vi for vi in model.graph.input if vi.name not in inits]


def declared_dims(vi: onnx.ValueInfoProto) -> list[int | str | None]:
    if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
        return []
    dims: list[int | str | None] = []
    for d in vi.type.tensor_type.shape.dim:
        if d.HasField("dim_value") and d.dim_value > 0:
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param") and d.dim_param:
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return dims


def resolve_input_shapes(model: onnx.ModelProto, overrides: Mapping[str, Shape] | None = None) -> dict[str, Shape]:
    """Concrete shape for every model input.

    Precedence: the user's override; else the declared static dims, with a symbolic *leading* dim taken
    as batch size 1. Any other unknown dim is an error naming the input and the flag that fixes it.
    """
    overrides = dict(overrides or {})
    inputs = graph_inputs(model)
    names = {vi.name for vi in inputs}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise InputError(f"--input-shape names {unknown[0]!r}, which is not an input (inputs: {sorted(names)})")
    resolved: dict[str, Shape] = {}
    for vi in inputs:
        if not vi.type.HasField("tensor_type"):
            raise UnresolvedShape(f"input {vi.name!r} is not a tensor; only tensor inputs are supported")
        dims = declared_dims(vi)
        has_shape = vi.type.tensor_type.HasField("shape")
        if vi.name in overrides:
            shape = overrides[vi.name]
            if has_shape and len(shape) != len(dims):
                raise InputError(f"--input-shape {one_line(vi.name)}: rank {len(shape)} given, the model declares rank {len(dims)}")
            for i, (want, have) in enumerate(zip(dims, shape)):
                if isinstance(want, int) and want != have:
                    raise InputError(f"--input-shape {one_line(vi.name)}: dim {i} is {have}, the model fixes it to {want}")
            resolved[vi.name] = shape
            continue
        example = shape_example(dims)
        if not has_shape:
            raise UnresolvedShape(f"input {vi.name!r} has no declared shape; pass --input-shape {one_line(vi.name)}:DIMS")
        shape_list: list[int] = []
        for i, d in enumerate(dims):
            if isinstance(d, int):
                shape_list.append(d)
            elif i == 0 and len(dims) > 1:
                shape_list.append(1)
            else:
                raise UnresolvedShape(
                    f"input {vi.name!r} has dynamic dims {dims}; pass --input-shape {one_line(vi.name)}:{example}"
                )
        if dims and not isinstance(dims[0], int) and len(dims) > 1:
            log.info("input %r: dynamic batch dim taken as 1", vi.name)
        resolved[vi.name] = tuple(shape_list)
    return resolved


def shape_example(dims: list[int | str | None]) -> str:
    """The DIMS of the ``--input-shape`` a user must pass: known dims filled in, a symbolic leading dim as 1,
    the others as letters to replace: ``H`` and ``W`` for the spatial dims of an image input (rank 4 with
    its channels known first, NCHW, or last, NHWC), else ``D<i>``."""
    letters = {i: f"D{i}" for i in range(len(dims))}
    if len(dims) == 4 and isinstance(dims[3], int) and not isinstance(dims[1], int):
        letters.update({1: "H", 2: "W"})  # NHWC
    elif len(dims) == 4:
        letters.update({1: "C", 2: "H", 3: "W"})
    return "x".join(str(d) if isinstance(d, int) else ("1" if i == 0 and len(dims) > 1 else letters[i]) for i, d in enumerate(dims))


def input_shape_notes(model: onnx.ModelProto, overrides: Mapping[str, Shape] | None = None) -> list[dict[str, object]]:
    """What :func:`resolve_input_shapes` chose without being told: one note per input whose symbolic leading
    (batch) dim was taken as 1 (``input``, ``dim`` 0, ``declared``: the symbol or null, ``value`` 1,
    ``note``: the same in words). Inputs named in ``overrides`` were told, so they have none."""
    given = overrides or {}
    notes: list[dict[str, object]] = []
    for vi in graph_inputs(model):
        if vi.name in given or not vi.type.HasField("tensor_type"):
            continue
        dims = declared_dims(vi)
        if len(dims) > 1 and not isinstance(dims[0], int):
            notes.append({"input": vi.name, "dim": 0, "declared": dims[0], "value": 1,
                          "note": f"symbolic leading (batch) dim {dims[0] if dims[0] is not None else '?'} taken as 1"})
    return notes


#: Initializers larger than this enter shape inference as dims and type only (inference needs no more, and
#: a model over protobuf's 2 GiB limit could not be inferred at all with its weights).
_INFERENCE_STRIP_BYTES = 1 << 20


def _without_big_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose large main-graph initializers carry dims and type but no data."""
    copy = onnx.ModelProto()
    copy_fields(model, copy, skip=("graph",))
    copy_fields(model.graph, copy.graph, skip=("initializer", "value_info"))
    for t in model.graph.initializer:
        if len(t.raw_data) > _INFERENCE_STRIP_BYTES:
            stub = copy.graph.initializer.add()
            stub.name, stub.data_type = t.name, t.data_type
            stub.dims.extend(t.dims)
        else:
            copy.graph.initializer.append(t)
    return copy


def _with_fixed_inputs(model: onnx.ModelProto, input_shapes: Mapping[str, Shape]) -> onnx.ModelProto:
    fixed = _without_big_weights(model)
    for vi in fixed.graph.input:
        if vi.name in input_shapes:
            shape = vi.type.tensor_type.shape
            del shape.dim[:]
            for d in input_shapes[vi.name]:
                shape.dim.add().dim_value = d
    # Outputs' declared symbolic dims would otherwise conflict with the now concrete ones.
    for vi in fixed.graph.output:
        if vi.type.HasField("tensor_type"):
            vi.type.tensor_type.ClearField("shape")
    return fixed


def _info_from_value(vi: onnx.ValueInfoProto) -> TensorInfo:
    if not vi.type.HasField("tensor_type"):
        return TensorInfo(None, None)
    tt = vi.type.tensor_type
    dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type) if tt.elem_type else None
    if not tt.HasField("shape"):
        return TensorInfo(dtype, None)
    dims = tuple(int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim)
    return TensorInfo(dtype, dims)


def infer_tensor_info(model: onnx.ModelProto, input_shapes: Mapping[str, Shape]) -> dict[str, TensorInfo]:
    """Dtype and shape of every tensor, inferred with the resolved input shapes.

    Never raises on models onnx cannot fully infer: whatever was inferred is returned, and passes that
    need a missing shape skip that node with a reason.
    """
    fixed = _with_fixed_inputs(model, input_shapes)
    try:
        inferred = onnx.shape_inference.infer_shapes(fixed, check_type=False, strict_mode=False, data_prop=True)
    except Exception as exc:  # onnx raises a variety of types from C++
        log.warning("shape inference failed (%s); continuing with declared shapes only", str(exc).splitlines()[0])
        inferred = fixed
    info: dict[str, TensorInfo] = {}
    g = inferred.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        info[vi.name] = _info_from_value(vi)
    for t in g.initializer:
        info[t.name] = TensorInfo(helper.tensor_dtype_to_np_dtype(t.data_type), tuple(int(d) for d in t.dims))
    return info
