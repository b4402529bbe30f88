"""Per-op-type time from onnxruntime's profiler, and bench_model on the sample."""

from __future__ import annotations

from pathlib import Path

import pytest

from rewriter.validation.profile import bench_model, op_times_from_trace
from rewriter.validation.runtime import RuntimeOptions


def kernel(op: str, dur: float, node: str = "n") -> dict:
    return {"cat": "Node", "name": f"{node}_kernel_time", "dur": dur, "args": {"op_name": op}}


def test_op_times_from_trace_sums_kernel_events_per_op() -> None:
    events = [
        {"cat": "Session", "name": "model_run", "dur": 9999},
        kernel("Conv", 100, "conv_1"),
        kernel("Conv", 50.5, "conv_2"),
        {"cat": "Node", "name": "conv_1_fence_before", "dur": 7, "args": {"op_name": "Conv"}},
        {"cat": "Node", "name": "conv_1_fence_after", "dur": 3, "args": {"op_name": "Conv"}},
        kernel("Relu", 20, "relu_1"),
        {"cat": "Node", "name": "gemm_kernel_time", "dur": 5},  # no args: counted as "?"
        {"cat": "Node", "name": "flatten_kernel_time", "args": {"op_name": "Flatten"}},  # no dur: 0
        {"name": "orphan_kernel_time", "dur": 1000, "args": {"op_name": "Add"}},  # no category
    ]
    assert op_times_from_trace(events) == {"Conv": 150.5, "Relu": 20.0, "?": 5.0, "Flatten": 0.0}


def test_op_times_from_empty_trace() -> None:
    assert op_times_from_trace([]) == {}


@pytest.mark.parametrize("optimization", ["all", "disabled"])
def test_bench_model_on_sample(sample_path: Path, optimization: str) -> None:
    result = bench_model(sample_path, runs=5, profile_runs=2, options=RuntimeOptions(optimization=optimization))
    assert result.options.optimization == optimization
    assert result.latency.runs == 5
    assert 0 < result.latency.p05_s <= result.latency.median_s <= result.latency.p95_s
    assert sum(result.op_share.values()) == pytest.approx(1.0)
    assert all(0 <= v <= 1 for v in result.op_share.values())
    # The sample is a CNN: convolutions take most of the time, and shares are listed largest first.
    assert "Conv" in result.op_share
    assert max(result.op_share, key=result.op_share.get) == "Conv"
    shares = list(result.op_share.values())
    assert shares == sorted(shares, reverse=True)
    assert list(result.op_time_ms) == list(result.op_share)
    assert result.op_time_ms["Conv"] > 0
    if optimization == "disabled":
        # Unfused graph: every op type of the sample shows up.
        assert {"Conv", "Relu", "MaxPool", "Concat", "Add", "GlobalAveragePool", "Flatten", "Gemm"} <= set(result.op_share)
