"""Intermediate activations on calibration feeds, for data-aware passes.

:class:`Calibration` implements the pass contract's :class:`~rewriter.contract.CalibrationData`: the
pipeline (and plan replay) builds one and hands it to every data-aware pass through
``Pass.use_calibration``; passes ask for tensors by name and never see onnxruntime. Tensors are captured by making them the graph outputs of the part of
the model that computes them (nodes after the last one needed are dropped: a capture from early layers
costs a fraction of a full run) and running that once over all calibration feeds; results are cached per
model version and name.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
import onnx
from onnx import helper

from rewriter.model import Model
from rewriter.validation.feeds import Feed
from rewriter.validation.runtime import RuntimeOptions, eval_session
from rewriter.validation.spill import SpillStore

#: Bytes of calibration data (captures, samples, moments, fits) a run keeps in memory; the rest waits on disk
#: (:mod:`~rewriter.validation.spill`).
MEMORY_BYTES = 128 << 20

log = logging.getLogger(__name__)

T = TypeVar("T")


def _session(proto: onnx.ModelProto):  # type: ignore[no-untyped-def]
    """Captures run as deployed (every requested tensor is a graph output, so no fusion hides it), on the
    CPU, with as many threads as reference sessions may use."""
    return eval_session(proto, RuntimeOptions())


def with_outputs(model: Model, names: Sequence[str], dtypes: Model | None = None) -> onnx.ModelProto:
    """A model whose outputs are ``names``: only the nodes they need (every graph input kept, so any
    feed still fits). Graphs with subgraph-carrying nodes keep every node and add the outputs. Element
    types come from ``dtypes`` (a version whose shapes are already inferred), else from ``model``."""
    graph = model.proto.graph
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    del proto.graph.output[:]
    outputs = {o.name: o for o in graph.output}
    for name in dict.fromkeys(names):
        if name in outputs:
            proto.graph.output.append(outputs[name])
        else:
            dtype = (dtypes.dtype(name) if dtypes is not None else None) or model.dtype(name) or np.float32
            proto.graph.output.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), None))
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        proto.graph.output.extend(o for o in graph.output if o.name not in set(names))
        return proto
    producers = {out: i for i, n in enumerate(graph.node) for out in n.output if out}
    needed: set[int] = set()
    stack = list(names)
    while stack:
        i = producers.get(stack.pop())
        if i is not None and i not in needed:
            needed.add(i)
            stack.extend(graph.node[i].input)
    del proto.graph.node[:]
    proto.graph.node.extend(n for i, n in enumerate(graph.node) if i in needed)
    used = {t for n in proto.graph.node for t in n.input} | set(names) | {i.name for i in graph.input}
    kept = [t for t in proto.graph.initializer if t.name in used]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    return proto


class Calibration:
    """Activations of the original model and of later versions, on the calibration feeds."""

    def __init__(self, original: Model, feeds: Sequence[Feed], max_capture_feeds: int = 16, memory_bytes: int = MEMORY_BYTES) -> None:
        if not feeds:
            raise ValueError("calibration needs at least one feed")
        self.original = original
        self.feeds = list(feeds)
        #: Whole tensors are kept for at most this many feeds (moments use every feed).
        self.max_capture_feeds = max_capture_feeds
        #: Captured tensors, memos and moments by (version, name), and lasting values by ("lasting", key): at
        #: most ``memory_bytes`` of them in memory, the least recently used on disk.
        self._cache = SpillStore(memory_bytes)
        self._keep: dict[int, Model] = {}
        self._transient: set[tuple[int, str]] = set()
        self._lasting: OrderedDict[str, int] = OrderedDict()  # key -> bytes, least recently used first
        #: Bytes of arrays :meth:`lasting` keeps (in memory or on disk).
        self.lasting_bytes = 256 << 20

    def _capture(self, model: Model, names: Sequence[str]) -> None:
        missing = [n for n in names if (id(model.proto), n) not in self._cache]
        if not missing:
            return
        session = _session(with_outputs(model, missing, self.original))
        out = {n: [] for n in missing}  # type: dict[str, list[np.ndarray]]
        for feed in self.feeds[: self.max_capture_feeds]:
            values = session.run(missing, feed)
            for n, v in zip(missing, values):
                out[n].append(v)
        for n in missing:
            self._cache[(id(model.proto), n)] = np.concatenate(out[n], axis=0)
        self._keep[id(model.proto)] = model  # keep the proto alive so its id is not reused
        self._evict(id(model.proto))
        log.debug("captured %d tensors on %d calibration feeds", len(missing), len(self.feeds))

    def moments(self, model: Model, names: Sequence[str], flops_per_feed: float = 5e7) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per tensor ``[N, C, ...]``: channel mean ``[C]`` and uncentred second moment ``E[x x^T]`` ``[C, C]``
        -- accumulated feed by feed in one run, without keeping the tensors. Large maps are subsampled on an
        even spatial grid to about ``flops_per_feed / C^2`` positions per feed (at least 256; deterministic)."""
        key = id(model.proto)
        missing = [n for n in dict.fromkeys(names) if (key, "moments:" + n) not in self._cache]
        if missing:
            proto = with_outputs(model, missing, self.original)
            session = _session(proto)
            sums = {n: None for n in missing}  # type: dict[str, list | None]
            for feed in self.feeds:
                for n, v in zip(missing, session.run(missing, feed)):
                    v = np.asarray(v, np.float32)
                    positions = int(np.prod(v.shape)) // v.shape[1]
                    max_positions = max(256, int(flops_per_feed / v.shape[1] ** 2))
                    if v.ndim == 4 and positions > max_positions:  # an even spatial grid first: cheap
                        step = int(np.ceil(np.sqrt(positions / max_positions)))
                        v = v[:, :, ::step, ::step]
                    flat = np.moveaxis(v, 1, -1).reshape(-1, v.shape[1])
                    # float32 products, summed in float32 (spectra need no more); an array times its own
                    # transpose goes to BLAS syrk (half the work of a general product, no transposed copy)
                    outer = flat.T @ flat
                    acc = sums[n]
                    if acc is None:
                        sums[n] = [flat.sum(axis=0, dtype=np.float64), outer, len(flat)]
                    else:
                        acc[0] += flat.sum(axis=0, dtype=np.float64)
                        acc[1] += outer
                        acc[2] += len(flat)
            for n in missing:
                total, outer, count = sums[n]  # type: ignore[misc]
                self._cache[(key, "moments:" + n)] = (total / count, outer.astype(np.float64) / count)
            self._keep[key] = model
            self._evict(key)
        return {n: self._cache[(key, "moments:" + n)] for n in names}

    def memo(self, model: Model, key: str, compute: Callable[[], T], *, while_current: bool = False) -> T:
        """``compute()`` once per model version and ``key``: data a pass derives from activations (samples,
        factorized solvers), kept and evicted like captured tensors (the current version and the original).
        ``while_current``: even for the original, keep it only until another version is worked on (data
        of the original's *inputs* to a layer, useless once the model has changed)."""
        slot = (id(model.proto), "memo:" + key)
        if slot not in self._cache:
            self._cache[slot] = compute()  # type: ignore[assignment]
            if while_current:
                self._transient.add(slot)
            self._keep[id(model.proto)] = model
            self._evict(id(model.proto))
        return self._cache[slot]  # type: ignore[return-value]

    def lineage(self, model: Model, tensor: str) -> str:
        """A digest of everything that computes ``tensor`` in ``model``: the names, ops and inputs of all the
        nodes upstream of it. Rewrites give new nodes fresh names (the pass contract), so two versions
        with the same lineage for a tensor give it the same values on the calibration feeds."""
        graph = model.proto.graph
        producers = {out: n for n in graph.node for out in n.output if out}
        seen: set[str] = set()
        parts: list[str] = []
        stack = [tensor]
        while stack:
            node = producers.get(stack.pop())
            if node is None or node.name in seen:
                continue
            seen.add(node.name)
            parts.append(f"{node.name}|{node.op_type}|{','.join(node.input)}")
            stack.extend(node.input)
        return hashlib.sha256("\n".join(sorted(parts)).encode()).hexdigest()[:32]

    def lasting(self, key: str, compute: Callable[[], T]) -> T:
        """``compute()`` once per ``key`` across versions (key it by :meth:`lineage`), the least recently
        used entries dropped beyond ``lasting_bytes`` of arrays."""
        if key in self._lasting:
            self._lasting.move_to_end(key)
            return self._cache[("lasting", key)]  # type: ignore[no-any-return]
        value = compute()
        self._cache[("lasting", key)] = value
        self._lasting[key] = self._cache.size(("lasting", key))
        while len(self._lasting) > 1 and sum(self._lasting.values()) > self.lasting_bytes:
            self._cache.pop(("lasting", self._lasting.popitem(last=False)[0]))
        return value

    def has_lasting(self, key: str) -> bool:
        return key in self._lasting

    def cached(self, model: Model, key: str) -> bool:
        """Whether :meth:`memo` holds ``key`` for this version."""
        return (id(model.proto), "memo:" + key) in self._cache

    def map(self, model: Model, names: Sequence[str], fn: Callable[[int, dict[str, np.ndarray]], T]) -> list[T]:
        """``fn(feed_index, {name: tensor})`` for every calibration feed, in one run of ``model``; the tensors
        themselves are not kept (for samples drawn from every feed without holding whole activations)."""
        names = list(dict.fromkeys(names))
        session = _session(with_outputs(model, names, self.original))
        return [fn(k, dict(zip(names, session.run(names, feed)))) for k, feed in enumerate(self.feeds)]

    def of(self, model: Model, names: Sequence[str]) -> dict[str, np.ndarray]:
        """Tensors of ``model`` (any version), each the calibration samples concatenated on axis 0."""
        self._capture(model, names)
        return {n: self._cache[(id(model.proto), n)] for n in names}

    def reference(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        """Tensors of the original model."""
        return self.of(self.original, names)

    def _evict(self, current: int) -> None:
        """Keep the original's tensors and the current version's; a pipeline only moves forward."""
        for key in [k for k in self._keep if k not in (current, id(self.original.proto))]:
            self._drop(key)
        for slot in [s for s in self._transient if s[0] != current]:
            self._cache.pop(slot, None)
            self._transient.discard(slot)

    def forget(self, model: Model) -> None:
        """Drop the cached tensors of a model version that is no longer needed."""
        self._drop(id(model.proto))

    def _drop(self, key: int) -> None:
        for k in [k for k in self._cache if k[0] == key]:
            self._cache.pop(k)
        self._keep.pop(key, None)
