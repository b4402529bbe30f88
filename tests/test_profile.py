"""Per-op-type time from onnxruntime's profiler, and bench_model on the sample."""

from __future__ import annotations

from pathlib import Path

import pytest

from rewriter.validation.profile import LayerTime, bench_model, latency_change, op_times_from_trace, profile_layer_times
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


# -- per-layer times before and after, and the noise rule -------------------------------------------------

def test_latency_change_needs_disjoint_ranges_and_a_visible_difference() -> None:
    before = LayerTime(1.00, 0.95, 1.05, 9)
    assert latency_change(before, LayerTime(0.80, 0.78, 0.82, 9)) == "faster"
    assert latency_change(before, LayerTime(1.30, 1.20, 1.40, 9)) == "slower"
    assert latency_change(before, LayerTime(0.80, 0.70, 0.96, 9)) == "unchanged"  # ranges overlap: noise
    assert latency_change(LayerTime(1.0, 1.0, 1.0, 9), LayerTime(0.97, 0.97, 0.97, 9)) == "unchanged"  # disjoint, under 5%
    assert latency_change(LayerTime(0.010, 0.010, 0.010, 9), LayerTime(0.009, 0.009, 0.009, 9)) == "unchanged"  # under the resolution


def test_profile_layer_times_interleaves_fresh_rounds_and_summarizes_their_medians() -> None:
    calls: list[tuple[str, int]] = []

    def profiler(proto, round_):  # type: ignore[no-untyped-def]
        calls.append((proto, round_))
        jitter = [0.0, 10.0, -10.0][round_ % 3]  # microseconds
        return {"conv": [100.0 + jitter, 999.0, 100.0 + jitter], "gone": []} if proto == "A" else {"conv": [90.0 + jitter] * 3}

    a, b = profile_layer_times(["A", "B"], profiler, rounds=4)  # type: ignore[list-item]
    assert calls == [("A", 0), ("B", 0), ("B", 1), ("A", 1), ("A", 2), ("B", 2), ("B", 3), ("A", 3)]
    assert a == {"conv": LayerTime(0.1, 0.09, 0.11, 4)}  # each round's median (999 is one slow run), in ms; "gone" never ran
    assert b["conv"].median == pytest.approx(0.09) and b["conv"].rounds == 4
    assert latency_change(a["conv"], b["conv"]) == "unchanged"  # 10% apart, but the round ranges overlap
