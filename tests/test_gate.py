"""The final gate (rewriter.gate): numerics within budget, not slower, and a required speedup or target shown.

Each case fixes the final latency's 95% CI by hand, so whether the gate passes is known without the formula.
"""

from __future__ import annotations

import dataclasses

import onnx
import pytest

from passes.fuse_1x1_chain import Fuse1x1Chain
from rewriter.gate import gate_failures
from rewriter.pipeline import OptimizeResult, optimize
from rewriter.validation.judge import ValidationConfig
from rewriter.validation.latency import LatencyComparison
from rewriter.validation.stats import RatioCI


@pytest.fixture(scope="module")
def exact_result(sample_model: onnx.ModelProto) -> OptimizeResult:
    """The sample model's exact 1x1 fusion, judged on numerics only (no latency measured)."""
    return optimize(sample_model, [Fuse1x1Chain()], config=ValidationConfig(latency=False))


def with_latency(result: OptimizeResult, low: float, high: float, target: float | None = None) -> OptimizeResult:
    """``result`` with a final speedup CI of [low, high] (point estimate at its middle) and target speedup ``target``."""
    ci = RatioCI((low + high) / 2, low, high, 10)
    return dataclasses.replace(result, final_latency=LatencyComparison(1e-3, 1e-3 / ci.speedup, ci, 1), target_speedup=target)


@pytest.mark.parametrize(
    ("low", "high", "require", "expected"),
    [
        (1.2, 1.5, True, None),
        (0.98, 1.3, False, None),  # exact gate: not shown slower is enough
        (0.98, 1.3, True, "no end-to-end speedup shown"),
        (0.7, 0.9, False, "slower than the input"),
    ],
)
def test_gate_failures(exact_result: OptimizeResult, low: float, high: float, require: bool, expected: str | None) -> None:
    failures = gate_failures(with_latency(exact_result, low, high), ValidationConfig(), require_speedup=require)
    if expected is None:
        assert failures == []
    else:
        assert len(failures) == 1 and expected in failures[0]


def test_gate_requires_a_measured_speedup(exact_result: OptimizeResult) -> None:
    assert exact_result.final_latency is None
    (failure,) = gate_failures(exact_result, ValidationConfig(), require_speedup=True)
    assert failure == "no end-to-end speedup: latency was not measured"


@pytest.mark.parametrize(
    ("target", "low", "high", "require", "expected"),
    [
        (1.2, 1.2, 1.5, True, []),  # the CI's low end exactly at the target: reached ("at or above")
        (1.2, 1.25, 1.35, True, []),
        (1.2, 1.19, 1.61, True, ["target speedup 1.2x not shown: 1.400x [1.190, 1.610] (the 95% CI must lie at or above it)"]),
        (1.5, 1.3, 1.45, True, ["target speedup 1.5x not shown: 1.375x [1.300, 1.450] (the 95% CI must lie at or above it)"]),
        (1.2, 1.1, 1.3, False, []),  # a target gates only when a speedup is required
        (1.2, 0.98, 1.5, True, ["no end-to-end speedup shown: 1.240x [0.980, 1.500] (the 95% CI must lie above 1)"]),
    ],
)
def test_gate_target_speedup(
    exact_result: OptimizeResult, target: float, low: float, high: float, require: bool, expected: list[str]
) -> None:
    result = with_latency(exact_result, low, high, target)
    assert gate_failures(result, ValidationConfig(), require_speedup=require) == expected
