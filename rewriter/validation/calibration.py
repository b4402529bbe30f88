"""Intermediate activations on calibration feeds, for data-aware passes.

The pipeline hands a :class:`Calibration` to passes through ``Model.calibration``; passes ask for tensors
by name and never see onnxruntime. Tensors are captured by adding them as extra graph outputs and running
the model once over all calibration feeds (graph optimizations disabled, so every named tensor exists);
results are cached per model version and name.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
import onnx
from onnx import helper

from rewriter.model import Model
from rewriter.validation.feeds import Feed
from rewriter.validation.runtime import reference_session

log = logging.getLogger(__name__)

T = TypeVar("T")


class Calibration:
    """Activations of the original model and of later versions, on the calibration feeds."""

    def __init__(self, original: Model, feeds: Sequence[Feed], max_capture_feeds: int = 16) -> None:
        if not feeds:
            raise ValueError("calibration needs at least one feed")
        self.original = original
        self.feeds = list(feeds)
        #: Whole tensors are kept for at most this many feeds (moments use every feed).
        self.max_capture_feeds = max_capture_feeds
        self._cache: dict[tuple[int, str], Any] = {}
        self._moments: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]] = {}
        self._keep: dict[int, Model] = {}

    @staticmethod
    def _with_outputs(model: Model, names: Sequence[str]) -> onnx.ModelProto:
        proto = onnx.ModelProto()
        proto.CopyFrom(model.proto)
        existing = {o.name for o in proto.graph.output}
        for name in names:
            if name not in existing:
                dtype = model.dtype(name) or np.float32
                proto.graph.output.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), None))
        return proto

    def _capture(self, model: Model, names: Sequence[str]) -> None:
        missing = [n for n in names if (id(model.proto), n) not in self._cache]
        if not missing:
            return
        session = reference_session(self._with_outputs(model, missing))
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
        missing = [n for n in dict.fromkeys(names) if (key, "moments:" + n) not in self._moments]
        if missing:
            proto = self._with_outputs(model, missing)
            session = reference_session(proto)
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
                    # float32 products, summed in float32 (spectra need no more); both operands contiguous:
                    # some BLAS builds are several times slower on a transposed view.
                    outer = np.ascontiguousarray(flat.T) @ flat
                    acc = sums[n]
                    if acc is None:
                        sums[n] = [flat.sum(axis=0, dtype=np.float64), outer, len(flat)]
                    else:
                        acc[0] += flat.sum(axis=0, dtype=np.float64)
                        acc[1] += outer
                        acc[2] += len(flat)
            for n in missing:
                total, outer, count = sums[n]  # type: ignore[misc]
                self._moments[(key, "moments:" + n)] = (total / count, outer.astype(np.float64) / count)
            self._keep[key] = model
            self._evict(key)
        return {n: self._moments[(key, "moments:" + n)] for n in names}

    def memo(self, model: Model, key: str, compute: Callable[[], T]) -> T:
        """``compute()`` once per model version and ``key``: data a pass derives from activations (samples,
        factorized solvers), kept and evicted like captured tensors (the current version and the original)."""
        slot = (id(model.proto), "memo:" + key)
        if slot not in self._cache:
            self._cache[slot] = compute()  # type: ignore[assignment]
            self._keep[id(model.proto)] = model
            self._evict(id(model.proto))
        return self._cache[slot]  # type: ignore[return-value]

    def map(self, model: Model, names: Sequence[str], fn: Callable[[int, dict[str, np.ndarray]], T]) -> list[T]:
        """``fn(feed_index, {name: tensor})`` for every calibration feed, in one run of ``model``; the tensors
        themselves are not kept (for samples drawn from every feed without holding whole activations)."""
        names = list(dict.fromkeys(names))
        session = reference_session(self._with_outputs(model, names))
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

    def forget(self, model: Model) -> None:
        """Drop the cached tensors of a model version that is no longer needed."""
        self._drop(id(model.proto))

    def _drop(self, key: int) -> None:
        for k in [k for k in self._cache if k[0] == key]:
            del self._cache[k]
        for k in [k for k in self._moments if k[0] == key]:
            del self._moments[k]
        self._keep.pop(key, None)
