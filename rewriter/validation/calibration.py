"""Intermediate activations on calibration feeds, for data-aware passes.

The pipeline hands a :class:`Calibration` to passes through ``Model.calibration``; passes ask for tensors
by name and never see onnxruntime. Tensors are captured by adding them as extra graph outputs and running
the model once over all calibration feeds (graph optimizations disabled, so every named tensor exists);
results are cached per model version and name.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper

from rewriter.model import Model
from rewriter.validation.feeds import Feed
from rewriter.validation.runtime import reference_session

log = logging.getLogger(__name__)


class Calibration:
    """Activations of the original model and of later versions, on the calibration feeds."""

    def __init__(self, original: Model, feeds: Sequence[Feed]) -> None:
        if not feeds:
            raise ValueError("calibration needs at least one feed")
        self.original = original
        self.feeds = list(feeds)
        self._cache: dict[tuple[int, str], np.ndarray] = {}
        self._keep: dict[int, Model] = {}

    def _capture(self, model: Model, names: Sequence[str]) -> None:
        missing = [n for n in names if (id(model.proto), n) not in self._cache]
        if not missing:
            return
        proto = onnx.ModelProto()
        proto.CopyFrom(model.proto)
        existing = {o.name for o in proto.graph.output}
        for name in missing:
            if name in existing:
                continue
            dtype = model.dtype(name) or np.float32
            proto.graph.output.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), None))
        session = reference_session(proto)
        out = {n: [] for n in missing}  # type: dict[str, list[np.ndarray]]
        for feed in self.feeds:
            values = session.run(missing, feed)
            for n, v in zip(missing, values):
                out[n].append(v)
        for n in missing:
            self._cache[(id(model.proto), n)] = np.concatenate(out[n], axis=0)
        self._keep[id(model.proto)] = model  # keep the proto alive so its id is not reused
        log.debug("captured %d tensors on %d calibration feeds", len(missing), len(self.feeds))

    def of(self, model: Model, names: Sequence[str]) -> dict[str, np.ndarray]:
        """Tensors of ``model`` (any version), each the calibration samples concatenated on axis 0."""
        self._capture(model, names)
        return {n: self._cache[(id(model.proto), n)] for n in names}

    def reference(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        """Tensors of the original model."""
        return self.of(self.original, names)

    def forget(self, model: Model) -> None:
        """Drop the cached tensors of a model version that is no longer needed."""
        key = id(model.proto)
        for k in [k for k in self._cache if k[0] == key]:
            del self._cache[k]
        self._keep.pop(key, None)
