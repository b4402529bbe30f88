"""The model under rewrite: built once per accepted version, shared by analysis, passes and validation."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from rewriter.errors import InputError
from rewriter.graph import const_value, finalize, to_onnx
from rewriter.io import copy_model, normalize_model, read_model
from rewriter.shapes import MaybeShape, Shape, TensorInfo, infer_tensor_info, resolve_input_shapes

log = logging.getLogger(__name__)


def name_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give every top-level node a unique name (in place); candidates and reports refer to nodes by name."""
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        name = node.name or f"{node.op_type}_{i}"
        base, k = name, 1
        while name in seen:
            name = f"{base}__{k}"
            k += 1
        node.name = name
        seen.add(name)
    return model


class Model:
    """One version of the model: its proto, a graph view, resolved input shapes and inferred tensor info.

    ``graph`` is an onnx-graphsurgeon view imported lazily from ``proto``. :meth:`fork` returns a version
    whose graph may be edited without touching this one; :meth:`commit` turns an edited fork into a new
    immutable version.
    """

    def __init__(
        self,
        proto: onnx.ModelProto,
        input_shapes: Mapping[str, Shape],
        info: dict[str, TensorInfo] | None = None,
    ) -> None:
        self.proto = proto
        self.input_shapes: dict[str, Shape] = dict(input_shapes)
        self._info = info
        self._graph: gs.Graph | None = None
        self._nodes: dict[str, gs.Node] | None = None
        #: The version this one descends from by forks and commits (itself for a loaded model): where a
        #: pass finds the original of something it rewrote before.
        self.root: Model = self
        #: The export quirks normalized when the model was loaded (:mod:`rewriter.io.normalize`), one note each.
        self.normalized: tuple[str, ...] = ()

    @classmethod
    def from_source(
        cls,
        source: str | os.PathLike[str] | onnx.ModelProto,
        input_shapes: Mapping[str, Shape] | None = None,
        *,
        max_bytes: int | None = None,
    ) -> Model:
        """Load (or copy) a model, normalize its harmless export quirks, name its nodes and resolve its input
        shapes. The source is not modified."""
        if isinstance(source, onnx.ModelProto):
            proto = copy_model(source)
            normalized = tuple(normalize_model(proto))
        elif isinstance(source, (str, os.PathLike)):
            loaded = read_model(source, max_bytes=max_bytes)
            proto, normalized = loaded.proto, loaded.normalized
        else:
            raise InputError(f"expected a model path or onnx.ModelProto, got {type(source).__name__}")
        name_nodes(proto)
        model = cls(proto, resolve_input_shapes(proto, input_shapes))
        model.normalized = normalized
        return model

    # -- lazily computed views -------------------------------------------------------------------------
    @property
    def graph(self) -> gs.Graph:
        if self._graph is None:
            graph = gs.import_onnx(self.proto)
            if self.proto.ir_version >= 4:
                # An initializer also listed as a graph input is a default the caller may override:
                # onnx-graphsurgeon drops it from the inputs; put it back so passes see a graph input
                # (and leave it alone) and export keeps the model's interface.
                tensors = graph.tensors()
                graph.inputs = [tensors[vi.name] for vi in self.proto.graph.input if vi.name in tensors]
            self._graph = graph
        return self._graph

    @property
    def info(self) -> dict[str, TensorInfo]:
        if self._info is None:
            self._info = infer_tensor_info(self.proto, self.input_shapes)
        return self._info

    def shape(self, tensor: str | gs.Tensor) -> MaybeShape:
        name = tensor if isinstance(tensor, str) else tensor.name
        ti = self.info.get(name)
        if ti is not None and ti.shape is not None:
            return ti.shape
        if isinstance(tensor, gs.Tensor) and tensor.shape is not None:
            return tuple(d if isinstance(d, int) and d > 0 else None for d in tensor.shape)
        return None

    def static_shape(self, tensor: str | gs.Tensor) -> Shape | None:
        shape = self.shape(tensor)
        if shape is None or any(d is None for d in shape):
            return None
        return tuple(int(d) for d in shape)  # type: ignore[arg-type]

    def dtype(self, tensor: str | gs.Tensor) -> np.dtype | None:
        name = tensor if isinstance(tensor, str) else tensor.name
        ti = self.info.get(name)
        return ti.dtype if ti is not None else None

    def node(self, name: str) -> gs.Node | None:
        if self._nodes is None:
            self._nodes = {n.name: n for n in self.graph.nodes}
        return self._nodes.get(name)

    def const(self, tensor: gs.Tensor | None) -> np.ndarray | None:
        return const_value(tensor)

    # -- versions --------------------------------------------------------------------------------------
    def fork(self) -> Model:
        """An editable copy: a fresh graph view over the same proto (weights are loaded lazily, not copied)."""
        child = Model(self.proto, self.input_shapes, self._info)
        child.root = self.root
        return child

    def commit(self) -> Model:
        """Finish an edited fork: drop dead nodes, sort, export. Returns a new version with fresh shape info."""
        proto = to_onnx(finalize(self.graph), self.proto)
        child = Model(proto, self.input_shapes)
        child.root = self.root
        return child
