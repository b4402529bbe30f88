"""Numerics and task metrics over large feed sets, in map/reduce form: locally or on Ray workers.

**Numerics** (:func:`sharded_numerics`). Each shard of feeds is run through the reference (the original
model, graph optimizations disabled) and the candidate; the map returns, per output, sufficient
statistics (:class:`~rewriter.validation.numerics.OutputPartial`, from
:func:`~rewriter.validation.numerics.partial_stats`): counts, maxima of the absolute, relative and allclose
errors, and the sums ``sum |c - r|``, ``<c, r>``, ``sum r^2``, ``sum c^2``, ``sum (c - r)^2`` and
top-1/top-5 hits. The reduce adds them up and :meth:`~rewriter.validation.numerics.OutputPartial.finish`
turns the total into the same :class:`~rewriter.validation.numerics.OutputStats` that
:func:`~rewriter.validation.numerics.compare_arrays` (itself ``partial_stats(...).finish()``) computes on the
whole set at once (maxima and counts exactly; sums up to float rounding).

**Task metrics** (:class:`ShardedMetric`): ``shards()``, ``map(session, shard) -> partial`` and
``reduce(partials) -> float``. An instance is itself a task metric ``fn(session) -> float`` (mapped
locally, shard after shard), so ``--metric module:INSTANCE`` works as it is; :func:`on_ray` wraps it so
that its map runs on Ray workers: the judged model's bytes go to the object store once per evaluation
and each task builds a deploy session with the same options. :class:`NpzTop1Accuracy` is an example:
top-1 accuracy over labelled ``.npz`` shards.

Shards are loaded where the map runs: a :class:`FileShard` (or a metric's file paths) must be readable
at the same path on every worker (shared storage); an :class:`ArrayShard` carries its feeds along.
"""

from __future__ import annotations

import abc
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import onnx

from rewriter.errors import InputError
from rewriter.validation.feeds import Feed, InputSpec, input_specs, load_array_feeds
from rewriter.validation.numerics import EXACT_ATOL, EXACT_RTOL, OutputPartial, OutputStats, partial_stats
from rewriter.validation.runtime import RuntimeOptions, deploy_session, reference_session, run_feeds

log = logging.getLogger(__name__)


# -- shards of feeds -----------------------------------------------------------------------------------
class FeedShard(Protocol):
    """Part of a feed set, loaded where the map runs."""

    def load(self, specs: Sequence[InputSpec]) -> list[Feed]: ...


@dataclass(frozen=True)
class ArrayShard:
    """Feeds held in memory (shipped to the worker with the task)."""

    feeds: tuple[Feed, ...]

    def load(self, specs: Sequence[InputSpec]) -> list[Feed]:
        return list(self.feeds)


@dataclass(frozen=True)
class FileShard:
    """A ``.npy``/``.npz`` file of feeds (see :func:`~rewriter.validation.feeds.load_array_feeds`)."""

    path: str

    def load(self, specs: Sequence[InputSpec]) -> list[Feed]:
        return load_array_feeds(self.path, specs)


def shard_feeds(feeds: Sequence[Feed], size: int) -> list[ArrayShard]:
    """Consecutive shards of at most ``size`` feeds."""
    if size < 1:
        raise InputError("shard size must be at least 1")
    return [ArrayShard(tuple(feeds[i:i + size])) for i in range(0, len(feeds), size)]


# -- numerics: map/reduce over OutputPartial (from rewriter.validation.numerics) ---------------------
def reduce_partials(shards: Sequence[Mapping[str, OutputPartial]]) -> dict[str, OutputStats]:
    """Add up per-shard statistics (outputs by name, in the first shard's order) and finish them."""
    if not shards:
        return {}
    names = list(shards[0])
    totals = dict(shards[0])
    for part in shards[1:]:
        if list(part) != names:
            raise ValueError(f"shards disagree on the outputs: {names} vs {list(part)}")
        for name in names:
            totals[name] = totals[name].merge(part[name])
    return {name: totals[name].finish() for name in names}


def numerics_map(
    reference: bytes,
    candidate: bytes,
    shard: FeedShard,
    specs: Sequence[InputSpec],
    rtol: float,
    atol: float,
    candidate_runtime: RuntimeOptions | None = None,
) -> dict[str, OutputPartial]:
    """The map: run one shard through both models and return per-output statistics."""
    feeds = shard.load(specs)
    ref_out = run_feeds(reference_session(reference), feeds)
    cand_sess = reference_session(candidate) if candidate_runtime is None else deploy_session(candidate, candidate_runtime)
    cand_out = run_feeds(cand_sess, feeds)
    names = [o.name for o in cand_sess.get_outputs()]
    out = {}
    for name in (list(ref_out[0]) if ref_out else []):
        if name not in names:
            raise ValueError(f"candidate has no output named {name!r}")
        out[name] = partial_stats(name, [f[name] for f in ref_out], [f[name] for f in cand_out], rtol=rtol, atol=atol)
    return out


def _as_bytes(model: str | os.PathLike[str] | onnx.ModelProto, input_shapes: Mapping[str, Any] | None) -> tuple[bytes, list[InputSpec]]:
    from rewriter.model import Model

    loaded = Model.from_source(model, input_shapes)
    return loaded.proto.SerializeToString(), input_specs(loaded.proto, loaded.input_shapes)


def sharded_numerics(
    reference: str | os.PathLike[str] | onnx.ModelProto,
    candidate: str | os.PathLike[str] | onnx.ModelProto,
    shards: Sequence[FeedShard],
    *,
    rtol: float = EXACT_RTOL,
    atol: float = EXACT_ATOL,
    input_shapes: Mapping[str, Any] | None = None,
    candidate_runtime: RuntimeOptions | None = None,
    ray_address: str | None = None,
) -> dict[str, OutputStats]:
    """Per-output numerics of ``candidate`` against ``reference`` over every shard's feeds.

    Both models run with graph optimizations disabled (the exact gate), or the candidate in a deploy
    session built with ``candidate_runtime``. With ``ray_address``, each shard is one Ray task (the
    model bytes go to the object store once); without it, shards run here one after another.
    """
    ref_bytes, specs = _as_bytes(reference, input_shapes)
    cand_bytes, _ = _as_bytes(candidate, input_shapes)
    if ray_address is None:
        partials = [numerics_map(ref_bytes, cand_bytes, s, specs, rtol, atol, candidate_runtime) for s in shards]
    else:
        from rewriter.ray_support import connect

        ray, _ = connect(ray_address)
        cpus = 1 if candidate_runtime is None else max(1, candidate_runtime.threads)
        task = _remote(ray, numerics_map).options(num_cpus=cpus)
        ref_ref, cand_ref = ray.put(ref_bytes), ray.put(cand_bytes)
        partials = ray.get([task.remote(ref_ref, cand_ref, s, specs, rtol, atol, candidate_runtime) for s in shards])
    return reduce_partials(partials)


# -- task metrics ----------------------------------------------------------------------------------------
class ShardedMetric(abc.ABC):
    """A task metric in map/reduce form (higher is better).

    ``map`` runs a session over one shard and returns a small picklable partial result; ``reduce`` turns
    the partials, in shard order, into the metric. Calling the metric with a session maps every shard
    here, in order: an instance serves as the pipeline's task metric ``fn(session) -> float``.
    """

    @abc.abstractmethod
    def shards(self) -> Sequence[Any]:
        """The shards (small, picklable descriptions: file paths, index ranges, ...)."""

    @abc.abstractmethod
    def map(self, session: Any, shard: Any) -> Any:
        """The partial result of one shard."""

    @abc.abstractmethod
    def reduce(self, partials: Sequence[Any]) -> float:
        """The metric from every shard's partial result."""

    def __call__(self, session: Any) -> float:
        return float(self.reduce([self.map(session, s) for s in self.shards()]))


def _onnx_dtype(type_name: str) -> np.dtype:
    names = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
             "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(uint8)": np.uint8}
    return np.dtype(names.get(type_name, np.float32))


@dataclass(frozen=True)
class NpzTop1Accuracy(ShardedMetric):
    """Top-1 accuracy over labelled ``.npz`` shards: samples stacked on the batch axis under ``inputs``
    (N x 3 x 224 x 224 for a model taking 1 x 3 x 224 x 224 or N x 3 x 224 x 224) and integer class
    labels under ``labels`` (N).

    The model's first input is fed and its ``output`` (index or name; N x C scores) is read. Samples run
    ``batch`` at a time (default: the model's fixed batch size, else the whole shard at once).
    """

    paths: tuple[str, ...]
    inputs: str = "x"
    labels: str = "y"
    output: int | str = 0
    batch: int | None = None

    def shards(self) -> Sequence[str]:
        return list(self.paths)

    def map(self, session: Any, shard: str) -> tuple[int, int]:
        with np.load(shard, allow_pickle=False) as data:
            x, y = data[self.inputs], data[self.labels]
        inp = session.get_inputs()[0]
        x = x.astype(_onnx_dtype(inp.type), copy=False)
        out_name = self.output if isinstance(self.output, str) else session.get_outputs()[self.output].name
        fixed = inp.shape[0] if inp.shape and isinstance(inp.shape[0], int) and inp.shape[0] > 0 else None
        step = max(1, self.batch or fixed or len(x))
        correct = 0
        for i in range(0, len(x), step):
            (scores,) = session.run([out_name], {inp.name: x[i:i + step]})
            correct += int(np.sum(np.argmax(scores, axis=1) == y[i:i + step]))
        return correct, int(len(y))

    def reduce(self, partials: Sequence[tuple[int, int]]) -> float:
        correct = sum(p[0] for p in partials)
        total = sum(p[1] for p in partials)
        return correct / total if total else 0.0


def session_model_bytes(session: Any) -> bytes | None:
    """The serialized model an onnxruntime session was built from, when it was built from bytes (the
    judge's deploy sessions are); ``None`` otherwise."""
    payload = getattr(session, "_model_bytes", None)  # onnxruntime's InferenceSession keeps it
    return payload if isinstance(payload, bytes) and payload else None


def metric_map(model: bytes, runtime: RuntimeOptions, metric: ShardedMetric, shards: Sequence[Any]) -> list[Any]:
    """A Ray task's part of a sharded metric: one deploy session, several shards."""
    session = deploy_session(model, runtime)
    return [metric.map(session, s) for s in shards]


class RayMetric:
    """A :class:`ShardedMetric` whose map runs on Ray workers; a task metric ``fn(session) -> float``.

    Each call ships the session's model to the object store once and runs contiguous groups of shards as
    tasks (about two per cluster CPU slot), each building one deploy session with ``runtime`` (the
    judge's options) and requesting ``runtime.threads`` CPUs. The partials are reduced in shard order.
    """

    def __init__(self, metric: ShardedMetric, address: str, runtime: RuntimeOptions | None = None) -> None:
        self.metric = metric
        self.address = address
        self.runtime = runtime or RuntimeOptions()
        self._warned = False

    def __call__(self, session: Any) -> float:
        from rewriter.ray_support import cluster_cpus, connect

        payload = session_model_bytes(session)
        if payload is None:
            if not self._warned:
                log.warning("the session does not carry its model; the sharded metric runs here, not on Ray")
                self._warned = True
            return self.metric(session)
        shards = list(self.metric.shards())
        if not shards:
            return float(self.metric.reduce([]))
        ray, _ = connect(self.address)
        cpus = max(1, self.runtime.threads)
        groups = _groups(shards, max(1, 2 * cluster_cpus(ray) // cpus))
        task = _remote(ray, metric_map).options(num_cpus=cpus)
        model_ref = ray.put(payload)
        results = ray.get([task.remote(model_ref, self.runtime, self.metric, g) for g in groups])
        return float(self.metric.reduce([p for part in results for p in part]))


def _groups(items: Sequence[Any], count: int) -> list[list[Any]]:
    """``items`` in at most ``count`` contiguous groups of near-equal size, in order."""
    count = max(1, min(count, len(items)))
    size, extra = divmod(len(items), count)
    out, start = [], 0
    for i in range(count):
        end = start + size + (1 if i < extra else 0)
        out.append(list(items[start:end]))
        start = end
    return out


def on_ray(metric: Callable[[Any], float], address: str, *, runtime: RuntimeOptions | None = None, name: str = "the metric") -> RayMetric:
    """Run a sharded metric's map on the Ray cluster at ``address``; a plain function cannot be sharded."""
    from rewriter.ray_support import import_ray

    if not isinstance(metric, ShardedMetric):
        raise InputError(f"{name} is not a ShardedMetric (shards/map/reduce), so it cannot run on Ray; drop --metric-ray-address")
    import_ray()  # missing: a usage error now, not at the first evaluation
    return RayMetric(metric, address, runtime)


_REMOTES: dict[Any, Any] = {}


def _remote(ray: Any, fn: Callable[..., Any]) -> Any:
    """``ray.remote(fn)``, made once per function in this process."""
    if fn not in _REMOTES:
        _REMOTES[fn] = ray.remote(fn)
    return _REMOTES[fn]


__all__ = [
    "ArrayShard",
    "FeedShard",
    "FileShard",
    "NpzTop1Accuracy",
    "OutputPartial",
    "RayMetric",
    "ShardedMetric",
    "numerics_map",
    "on_ray",
    "partial_stats",
    "reduce_partials",
    "session_model_bytes",
    "shard_feeds",
    "sharded_numerics",
]
