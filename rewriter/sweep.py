"""Speedup-vs-error sweep: the path of the guarded greedy search, measured end to end at every step.

One search runs at the loosest budget the user allows. Each lossy rewrite it keeps is a step; after each
step the whole model is compared with the original -- numerics on the validation feeds (``error`` =
1 - the lowest cosine over outputs, and the largest max-abs error), the task metric if one is given, and
the end-to-end speedup with its 95% CI (interleaved, the deploy settings). The points on the Pareto
front (no other point is both faster and more accurate) are the choices worth offering; ``optimize``
with a budget between two points stops near the first one. Measuring one path costs one search plus a
latency A/B per step, instead of one search per budget.

Each point also carries the worst value over outputs of every term of the budget (``budget_values``, e.g.
``{"cosine": 0.9991, "top1_drop": 0.0}``), so a curve can be drawn in the budget's own metric; the result
carries the environment the latencies were measured in and the input file's path and sha256 (what the
sweep page, :func:`rewriter.html_report.render_sweep_html`, shows).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from rewriter.contract import Pass
from rewriter.model import Model
from rewriter.pipeline import Decision, OptimizeResult, Source, optimize
from rewriter.shapes import Shape
from rewriter.validation.feeds import FeedSet
from rewriter.validation.judge import Judge, ValidationConfig
from rewriter.validation.numerics import Budget, OutputStats
from rewriter.validation.runtime import eval_session

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepPoint:
    step: int
    label: str
    speedup: float
    ci_low: float
    ci_high: float
    #: 1 - the lowest cosine similarity over the model's outputs.
    error: float
    max_abs: float
    metric: float | None
    macs: int
    #: The worst value over outputs of each budget term (key: the metric, ``@output`` when the term names
    #: one); ``None`` where no output has a finite value (an SNR of identical outputs).
    budget_values: Mapping[str, float | None] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "budget_values": dict(self.budget_values)}


@dataclass
class SweepResult:
    points: list[SweepPoint]
    search: OptimizeResult
    front: list[int] = field(default_factory=list)
    #: :func:`rewriter.report.environment` of the measurements (tool and runtime versions, provider, threads, CPU).
    environment: Mapping[str, Any] = field(default_factory=dict)
    #: ``path`` and ``sha256`` of the input file (empty when the sweep was handed a model in memory).
    input: Mapping[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "input": dict(self.input),
            "environment": dict(self.environment),
            "points": [p.to_dict() for p in self.points],
            "front": self.front,
            "budget": self.search.budget,
            "feeds": self.search.feeds,
            "seconds_search": round(self.search.seconds, 2),
        }


def budget_values(budget: Budget, stats: Mapping[str, OutputStats]) -> dict[str, float | None]:
    """The worst value over outputs of each term of ``budget`` (the lowest of a ``>=`` term, the highest of a
    ``<=`` one), keyed by the term's metric (and ``@output``)."""
    out: dict[str, float | None] = {}
    for b in budget.bounds:
        vals = [v for name, s in stats.items() if b.output in (None, name) for v in [s.value(b.metric)] if v is not None and math.isfinite(v)]
        out[b.metric + (f"@{b.output}" if b.output else "")] = (min(vals) if b.op == ">=" else max(vals)) if vals else None
    return out


def _input_of(source: Source, input_path: str | os.PathLike[str] | None) -> dict[str, str]:
    from rewriter.io import sha256_file

    path = input_path if input_path is not None else source if isinstance(source, (str, os.PathLike)) else None
    return {} if path is None else {"path": str(path), "sha256": sha256_file(path)}


class TradeOff(Protocol):
    """A point of a speedup-vs-error curve (:class:`SweepPoint`, :class:`~rewriter.report.ParetoPoint`)."""

    @property
    def speedup(self) -> float: ...

    @property
    def error(self) -> float: ...


P = TypeVar("P", bound=TradeOff)


def pareto_front(points: Sequence[P]) -> list[P]:
    """The points no other point beats, in input order: the front of the CLI table and of the HTML page.

    A point is beaten by another that is at least as fast and at least as accurate and strictly better on
    one count (higher speedup or lower error). Tie rule: points with the same speedup and the same error
    do not beat each other, so identical points are on the front together or off it together.
    """
    return [
        p
        for p in points
        if not any((q.speedup >= p.speedup and q.error < p.error) or (q.speedup > p.speedup and q.error <= p.error) for q in points)
    ]


def sweep(
    source: Source,
    passes: str | Sequence[str | Pass] = ("bottleneck",),
    *,
    input_shapes: Mapping[str, Shape] | None = None,
    feeds: FeedSet | None = None,
    config: ValidationConfig | None = None,
    time_budget_s: float | None = None,
    screen: bool = True,
    input_path: str | os.PathLike[str] | None = None,
) -> SweepResult:
    """Run the search once at ``config``'s (loosest) budget and measure every kept lossy step. The curve is
    the search's own: a test split in ``feeds`` is left out (nothing is confirmed or backed off).
    ``input_path``: the file a ``source`` in memory was loaded from (its sha256 goes into the result)."""
    from rewriter.analysis import analyze
    from rewriter.report import environment

    config = config or ValidationConfig()
    feeds = None if feeds is None else feeds.for_search()
    original = source if isinstance(source, Model) else Model.from_source(source, input_shapes)
    steps: list[tuple[str, Model]] = [("original", original)]

    def record(decision: Decision, model: Model) -> None:
        if decision.kept and not decision.exact:
            steps.append((decision.candidate.description, model))

    judge = Judge(original, feeds, config)  # one reference run, for the search and the measurements after it
    result = optimize(original, passes, feeds=feeds, config=config, time_budget_s=time_budget_s, on_decision=record, judge=judge,
                      screen=screen)
    points = []
    for i, (label, model) in enumerate(steps):
        session = eval_session(model.proto, config.runtime)
        stats = judge.numerics(model.proto, session)
        metric = None if config.metric is None else judge.metric_value(model.proto, session)
        if i == 0:
            speedup = low = high = 1.0
        else:
            ci = judge.model_latency(original.proto, model.proto).ci
            speedup, low, high = ci.speedup, ci.low, ci.high
        points.append(SweepPoint(
            i, label, speedup, low, high,
            error=max(1.0 - s.cosine for s in stats.values()),
            max_abs=max(s.max_abs for s in stats.values()),
            metric=metric,
            macs=analyze(model).total_macs,
            budget_values=budget_values(config.budget, stats),
        ))
        log.info("step %d: speedup %.3f, error %.3g (%s)", i, speedup, points[-1].error, label)
    env = environment(config.runtime.provider, config.runtime.threads)
    return SweepResult(points, result, [p.step for p in pareto_front(points)], env, _input_of(source, input_path))
