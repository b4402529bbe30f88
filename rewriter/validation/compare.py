"""Compare two models (``onnx-bottleneck validate``): numerics of the candidate against the base as
reference, and their latency A/B."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import onnx

from rewriter.errors import InputError
from rewriter.model import Model
from rewriter.shapes import Shape
from rewriter.validation.feeds import FeedSet
from rewriter.validation.judge import Judge, ValidationConfig
from rewriter.validation.latency import LatencyComparison
from rewriter.validation.numerics import OutputStats


@dataclass(frozen=True)
class ValidationReport:
    numerics: dict[str, OutputStats]
    failures: list[str]
    latency: LatencyComparison | None
    exact: bool
    budget: str
    metric_base: float | None = None
    metric_candidate: float | None = None

    slower_below: float = 0.99

    @property
    def slower(self) -> bool:
        """Shown slower: the speedup CI lies wholly below ``slower_below`` (a 1% margin for noise by default)."""
        return self.latency is not None and self.latency.ci.slower(self.slower_below)

    @property
    def passed(self) -> bool:
        return not self.failures and not self.slower

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "budget": self.budget,
            "failures": self.failures,
            "slower": self.slower,
            "numerics": {k: v.to_dict() for k, v in self.numerics.items()},
            "latency": None if self.latency is None else self.latency.to_dict(),
            "metric": None if self.metric_base is None else {"base": self.metric_base, "candidate": self.metric_candidate},
        }


def validate_models(
    base: str | os.PathLike[str] | onnx.ModelProto | Model,
    candidate: str | os.PathLike[str] | onnx.ModelProto,
    *,
    input_shapes: Mapping[str, Shape] | None = None,
    feeds: FeedSet | None = None,
    config: ValidationConfig | None = None,
    exact: bool = True,
) -> ValidationReport:
    """Judge ``candidate`` against ``base``: exact gate (``exact=True``) or the config's lossy budget."""
    config = config or ValidationConfig()
    ref = base if isinstance(base, Model) else Model.from_source(base, input_shapes)
    cand = Model.from_source(candidate, input_shapes)
    if set(ref.input_shapes) != set(cand.input_shapes):
        raise InputError(f"the models take different inputs: {sorted(ref.input_shapes)} vs {sorted(cand.input_shapes)}")
    ref_outputs = [o.name for o in ref.proto.graph.output]
    cand_outputs = {o.name for o in cand.proto.graph.output}
    missing = [o for o in ref_outputs if o not in cand_outputs]
    if missing:
        raise InputError(f"the candidate lacks output(s) {missing}")
    judge = Judge(ref, feeds, config)
    stats = judge.numerics(cand.proto)
    failures = judge.config.budget.failures(stats, exact)
    metric_base = metric_cand = None
    if config.metric is not None:
        metric_base, metric_cand = judge.metric_baseline, judge.metric_value(cand.proto)
        why = config.metric.failure(metric_base or 0.0, metric_cand)
        if why is not None:
            failures.append(why)
    latency = judge.model_latency(ref.proto, cand.proto) if config.latency else None
    return ValidationReport(
        stats, failures, latency, exact, judge.config.budget.describe(exact), metric_base, metric_cand, config.exact_min_speedup
    )
