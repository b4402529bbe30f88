"""Latency of one model (``onnx-bottleneck bench``) and where the time goes, per op type, from
onnxruntime's profiler (the sum of kernel times of each op type over the profiled runs)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass

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
