"""Latency of one model (``onnx-bottleneck bench``) and where the time goes, per op type, from
onnxruntime's profiler (the sum of kernel times of each op type over the profiled runs); and each layer's
time before and after a rewrite, profiled over interleaved rounds, with the rule that tells a change from
noise (:func:`latency_change`)."""

from __future__ import annotations

import json
import os
import statistics
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import onnx

from rewriter.model import Model
from rewriter.shapes import Shape
from rewriter.validation.feeds import input_specs, random_feeds
from rewriter.validation.latency import LatencyProfile, time_session
from rewriter.validation.runtime import RuntimeOptions, deploy_session


@dataclass(frozen=True)
class BenchResult:
    latency: LatencyProfile
    op_share: dict[str, float]
    op_time_ms: dict[str, float]
    options: RuntimeOptions


def op_times_from_trace(events: list[dict]) -> dict[str, float]:
    """Total kernel microseconds per op type from a Chrome-trace profile written by onnxruntime."""
    totals: dict[str, float] = {}
    for ev in events:
        if ev.get("cat") != "Node" or not str(ev.get("name", "")).endswith("_kernel_time"):
            continue
        op = ev.get("args", {}).get("op_name", "?")
        totals[op] = totals.get(op, 0.0) + float(ev.get("dur", 0))
    return totals


def bench_model(
    source: str | os.PathLike[str],
    *,
    input_shapes: Mapping[str, Shape] | None = None,
    runs: int = 50,
    options: RuntimeOptions | None = None,
    profile_runs: int = 10,
    seed: int = 0,
) -> BenchResult:
    options = options or RuntimeOptions()
    model = Model.from_source(source, input_shapes)
    feed = random_feeds(input_specs(model.proto, model.input_shapes), 1, seed=seed)[0]
    latency = time_session(deploy_session(model.proto, options), feed, runs)
    with tempfile.TemporaryDirectory() as tmp:
        session = deploy_session(model.proto, options, profile_prefix=os.path.join(tmp, "profile"))
        names = [o.name for o in session.get_outputs()]
        for _ in range(max(1, profile_runs)):
            session.run(names, feed)
        trace = session.end_profiling()
        with open(trace, encoding="utf-8") as fh:
            events = json.load(fh)
    totals = op_times_from_trace(events)
    grand = sum(totals.values()) or 1.0
    order = sorted(totals, key=lambda k: -totals[k])
    share = {k: totals[k] / grand for k in order}
    per_run_ms = {k: totals[k] / 1e3 / max(1, profile_runs) for k in order}
    return BenchResult(latency, share, per_run_ms, options)


# -- per-layer latency, before and after a rewrite ------------------------------------------------------
def node_durations_from_trace(events: Iterable[Mapping[str, Any]]) -> dict[str, list[float]]:
    """Kernel microseconds of each node name, one entry per run, from onnxruntime's Chrome-trace profile."""
    out: dict[str, list[float]] = {}
    suffix = "_kernel_time"
    for ev in events:
        name = str(ev.get("name", ""))
        if ev.get("cat") != "Node" or not name.endswith(suffix):
            continue
        out.setdefault(name[: -len(suffix)], []).append(float(ev.get("dur", 0)))
    return out


#: ``profiler(proto, round) -> {node name: [kernel microseconds of each run]}``: one profiled session.
NodeProfiler = Callable[[onnx.ModelProto, int], Mapping[str, Sequence[float]]]


def ort_node_profiler(input_shapes: Mapping[str, Shape], options: RuntimeOptions | None = None, *, runs: int = 5,
                      seed: int = 0) -> NodeProfiler:
    """A :data:`NodeProfiler` over onnxruntime's profiler: a fresh session per call at ``ORT_ENABLE_BASIC`` (every
    timed kernel is a graph node and keeps its name; ``ORT_ENABLE_ALL`` fuses and renames nodes), one seeded
    random feed, one warm-up run (the first run allocates; its times are dropped) and ``runs`` profiled runs."""
    base = options or RuntimeOptions()
    opts = RuntimeOptions(provider=base.provider, threads=base.threads, optimization="basic")

    def profile(proto: onnx.ModelProto, round_: int) -> dict[str, list[float]]:
        feed = random_feeds(input_specs(proto, dict(input_shapes)), 1, seed=seed)[0]
        with tempfile.TemporaryDirectory() as tmp:
            session = deploy_session(proto, opts, profile_prefix=os.path.join(tmp, "profile"))
            names = [o.name for o in session.get_outputs()]
            session.run(names, feed)  # warm-up: its kernel times are the first entry of each node, dropped below
            for _ in range(max(1, runs)):
                session.run(names, feed)
            with open(session.end_profiling(), encoding="utf-8") as fh:
                events = json.load(fh)
        return {k: v[1:] if len(v) > 1 else v for k, v in node_durations_from_trace(events).items()}

    return profile


@dataclass(frozen=True)
class LayerTime:
    """One layer's time in milliseconds per run: the median over rounds of each round's median, and the
    lowest and highest round median (the spread the noise rule compares)."""

    median: float
    low: float
    high: float
    rounds: int

    @classmethod
    def of(cls, round_medians_us: Sequence[float]) -> LayerTime:
        ms = [v / 1e3 for v in round_medians_us]
        return cls(statistics.median(ms), min(ms), max(ms), len(ms))

    def to_dict(self) -> dict[str, float | int]:
        return {"median_ms": self.median, "low_ms": self.low, "high_ms": self.high, "rounds": self.rounds}


#: Differences below this many milliseconds are below the profiler's microsecond resolution and count as noise.
RESOLUTION_MS = 0.002
#: Differences of the medians below this share of the before median are not drawn as a change.
MIN_RELATIVE_CHANGE = 0.05


def latency_change(before: LayerTime, after: LayerTime) -> str:
    """``unchanged``, ``faster`` or ``slower``: the noise rule of the per-layer latency chart.

    Rule: each side's spread is the range [lowest, highest] of its per-round medians (fresh sessions, the
    sides interleaved round by round, see :func:`profile_layer_times`). A layer changed only when

    * the two ranges are disjoint (every round of one side beat every round of the other: with ``n``
      rounds a side, two sides drawn from one distribution do so with probability ``2 / C(2n, n)``), and
    * the medians differ by more than :data:`MIN_RELATIVE_CHANGE` of the before median and by more than
      :data:`RESOLUTION_MS`.

    Otherwise the difference lies within the noise and the layer is ``unchanged``.
    """
    diff = after.median - before.median
    if abs(diff) <= max(RESOLUTION_MS, MIN_RELATIVE_CHANGE * before.median):
        return "unchanged"
    if after.high < before.low:
        return "faster"
    if after.low > before.high:
        return "slower"
    return "unchanged"


def profile_layer_times(protos: Sequence[onnx.ModelProto], profiler: NodeProfiler, *, rounds: int = 5) -> list[dict[str, LayerTime]]:
    """Per model, each node's :class:`LayerTime` over ``rounds`` rounds. Within a round each model is profiled
    once, the order alternating between rounds (A B, B A, ...), so that drift of the machine falls on
    both sides alike. A node seen in no round has no entry."""
    samples: list[dict[str, list[float]]] = [{} for _ in protos]
    order = list(range(len(protos)))
    for r in range(max(1, rounds)):
        for i in order if r % 2 == 0 else reversed(order):
            for name, runs in profiler(protos[i], r).items():
                if runs:
                    samples[i].setdefault(name, []).append(statistics.median(runs))
    return [{name: LayerTime.of(v) for name, v in s.items()} for s in samples]
