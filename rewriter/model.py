"""The model under rewrite: built once per accepted version, shared by analysis, passes and validation."""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from rewriter.errors import InputError, UnresolvedShape
from rewriter.graph import const_value, finalize, to_onnx
from rewriter.io import copy_model, normalize_model, read_model
from rewriter.memory import give_back_memory
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


#: A dropped graph view that loaded at least this many bytes of weights is collected at once. A full collection
#: costs time in proportion to every object Python holds (~0.1 s in a lossy search); a few weights are not worth it.
COLLECT_BYTES = 8 << 20


def _loaded_bytes(graph: gs.Graph) -> int:
    """Bytes of the weights a graph view holds as arrays (loaded or made), not those still read lazily."""
    return sum(np.asarray(t._values).nbytes for t in graph.tensors().values()
               if isinstance(t, gs.Constant) and not isinstance(t._values, LazyValues))


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
        #: Why the input shapes could not be resolved (a model loaded with ``defer_unresolved``), else ``None``.
        self.unresolved: str | None = None
        #: The nodes' names as the source gave them (``None``: no name), where :func:`name_nodes` changed some
        #: (see :meth:`as_given`).
        self._given_names: tuple[str | None, ...] | None = None

    @classmethod
    def from_source(
        cls,
        source: str | os.PathLike[str] | onnx.ModelProto,
        input_shapes: Mapping[str, Shape] | None = None,
        *,
        max_bytes: int | None = None,
        defer_unresolved: bool = False,
    ) -> Model:
        """Load (or copy) a model, normalize its harmless export quirks, name its nodes and resolve its input
        shapes. The source is not modified.

        ``defer_unresolved``: a model whose input shapes cannot all be resolved (a dynamic dim, an input
        that is not a tensor) still loads, with no resolved shapes; :attr:`unresolved` keeps the error and
        :meth:`require_shapes` raises it -- for a caller that may find nothing to do, and then needs no
        feeds. A mistake in ``input_shapes`` itself is raised at once.
        """
        if isinstance(source, onnx.ModelProto):
            proto = copy_model(source)
            normalized = tuple(normalize_model(proto))
        elif isinstance(source, (str, os.PathLike)):
            loaded = read_model(source, max_bytes=max_bytes)
            proto, normalized = loaded.proto, loaded.normalized
        else:
            raise InputError(f"expected a model path or onnx.ModelProto, got {type(source).__name__}")
        given = tuple(node.name if node.HasField("name") else None for node in proto.graph.node)  # proto2: unset is not ""
        name_nodes(proto)
        unresolved = None
        try:
            shapes = resolve_input_shapes(proto, input_shapes)
        except UnresolvedShape as exc:  # a mistake in the user's own --input-shape is raised at once
            if not defer_unresolved:
                raise
            shapes, unresolved = {}, str(exc)
            log.info("input shapes not resolved (%s); they are needed only if there is something to rewrite", exc)
        model = cls(proto, shapes)
        model.normalized, model.unresolved = normalized, unresolved
        if given != tuple(node.name for node in proto.graph.node):
            model._given_names = given
        return model

    def require_shapes(self) -> dict[str, Shape]:
        """The resolved input shapes; :class:`InputError` when they could not be resolved (see :meth:`from_source`)."""
        if self.unresolved is not None:
            raise InputError(self.unresolved)
        return self.input_shapes

    def as_given(self) -> onnx.ModelProto:
        """This loaded version as the source gave it: the proto, with the nodes' names as they were before
        :func:`name_nodes` named the unnamed ones and renamed duplicates (a copy only when it did). What a
        run that keeps no rewrite writes: the input's graph, normalized, and nothing else."""
        if self._given_names is None:
            return self.proto
        proto = copy_model(self.proto)
        for node, name in zip(proto.graph.node, self._given_names):
            if name is None:
                node.ClearField("name")
            else:
                node.name = name
        return proto

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

    def release(self) -> int:
        """Drop the graph view built on demand and its node index: the weights it loaded as arrays go with them
        (a copy of every weight a pass looked at). Built again when next asked for; the proto is untouched.
        Returns the bytes of those arrays (whether a collection is worth it: :data:`COLLECT_BYTES`)."""
        graph, self._graph, self._nodes = self._graph, None, None
        return 0 if graph is None else _loaded_bytes(graph)

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
        graph = finalize(self.graph)
        heavy = _loaded_bytes(graph) >= COLLECT_BYTES
        if heavy:  # the weights the rewrites replaced, cut off but held by cycles, go before the export adds a copy
            gc.collect()
        proto = to_onnx(graph, self.proto)
        del graph
        self.release()  # the fork's graph and its weight arrays are done with
        give_back_memory(collect=heavy)
        child = Model(proto, self.input_shapes)
        child.root = self.root
        return child
