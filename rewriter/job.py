"""One guarded optimization of one model file: what ``optimize`` and each ``optimize-many`` job run.

:class:`OptimizeOptions` holds every option of the run as plain, picklable values (pass names, paths,
numbers, a ``module:function`` metric spec), so the same options can be handed to a worker process or a
Ray task. :func:`optimize_model` loads the model, judges every candidate and applies the final gate; it
writes nothing. The caller writes the model, the plan and the report (:meth:`OptimizeOutcome.report`,
:meth:`OptimizeOutcome.plan`), so that where the files go is its business.
"""

from __future__ import annotations

import logging
import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

from rewriter.contract import Pass
from rewriter.errors import InputError
from rewriter.outcome import Outcome
from rewriter.pipeline import OptimizeResult
from rewriter.plan import Plan
from rewriter.shapes import Shape
from rewriter.validation.feeds import FeedSet
from rewriter.validation.judge import ValidationConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OptimizeOptions:
    """The options of one guarded optimization, named and defaulted as on the command line."""

    #: Comma-separated pass names, or ``None`` for every exact pass.
    passes: str | None = None
    #: Keyword options per pass (a config file's ``[pass-options.NAME]`` tables).
    pass_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    input_shapes: dict[str, Shape] = field(default_factory=dict)
    feeds: tuple[str, ...] = ()
    images: str | None = None
    image_spec: str | None = None
    #: Task metric as ``module:function`` (or ``file.py:function``), higher is better.
    metric: str | None = None
    max_metric_drop: float = 0.01
    min_metric: float | None = None
    #: Run a sharded metric's map over this Ray cluster (``auto``, ``ray://host:10001``, ...).
    metric_ray_address: str | None = None
    num_feeds: int = 8
    seed: int = 0
    max_error: str | None = None
    rtol: float = 1e-4
    atol: float = 1e-5
    latency: bool = True
    subgraph: bool = True
    threads: int = 1
    provider: str = "cpu"
    min_speedup: float = 1.0
    exact_min_speedup: float = 0.99
    max_pairs: int = 40
    time_budget: float | None = None
    #: Screen lossy passes before judging (see rewriter.search).
    screen: bool = True
    #: Stop lossy passes once the whole model is measured this much faster (CI lower bound).
    target_speedup: float | None = None
    max_model_bytes: int | None = None
    external_data: bool | None = None
    fail_if_no_speedup: bool = False

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["input_shapes"] = {k: list(v) for k, v in self.input_shapes.items()}
        data["feeds"] = list(self.feeds)
        return data

    def check(self) -> None:
        """Usage errors that need no model (:class:`InputError`)."""
        if self.fail_if_no_speedup and not self.latency:
            raise InputError("--fail-if-no-speedup needs latency measurement; drop --no-latency")
        if self.target_speedup is not None:
            if not self.target_speedup > 1.0:
                raise InputError(f"--target-speedup must be above 1 (got {self.target_speedup:g})")
            if not self.latency:
                raise InputError("--target-speedup needs latency measurement; drop --no-latency")

    def build_passes(self) -> list[Pass]:
        from rewriter.config import build_passes

        return build_passes(self.passes, self.pass_options)

    def validation_config(self) -> ValidationConfig:
        """The judge's configuration; imports the metric (a usage error if it cannot be loaded)."""
        from rewriter.validation.judge import TaskMetric, load_metric
        from rewriter.validation.latency import TimingOptions
        from rewriter.validation.numerics import Budget
        from rewriter.validation.runtime import RuntimeOptions

        runtime = RuntimeOptions(provider=self.provider, threads=self.threads)
        metric = None
        if self.metric is not None:
            fn = load_metric(self.metric)
            if self.metric_ray_address is not None:
                from rewriter.validation.sharded import on_ray

                fn = on_ray(fn, self.metric_ray_address, runtime=runtime, name=f"--metric {self.metric!r}")
            metric = TaskMetric(fn, self.max_metric_drop, self.metric, self.min_metric)
        elif self.metric_ray_address is not None:
            raise InputError("--metric-ray-address needs --metric")
        return ValidationConfig(
            budget=Budget.parse(self.max_error, rtol=self.rtol, atol=self.atol),
            runtime=runtime,
            latency=self.latency,
            subgraph_latency=self.subgraph,
            exact_min_speedup=self.exact_min_speedup,
            lossy_min_speedup=self.min_speedup,
            timing=TimingOptions(max_pairs=self.max_pairs, min_pairs=min(10, self.max_pairs)),
            metric=metric,
        )


@dataclass
class OptimizeOutcome:
    """A finished run, before anything is written: the result, what it was judged with, and the gate."""

    result: OptimizeResult
    options: OptimizeOptions
    config: ValidationConfig
    feeds: FeedSet
    input_sha256: str
    #: The final gate's failures; empty when the output may be written.
    gate: list[str]

    def report(self, input_path: str, output_path: str | None, output_sha256: str | None) -> dict[str, Any]:
        """The JSON report (schema version 2); the output is recorded only when the gate passed."""
        from rewriter.report import build_report

        return build_report(
            self.result, input_path=input_path, input_sha256=self.input_sha256,
            output_path=None if self.gate else output_path, output_sha256=output_sha256,
            provider=self.options.provider, threads=self.options.threads, gate=self.gate,
            pass_options=self.options.pass_options,
        )

    def plan(self, output_sha256: str | None) -> Plan:
        """The kept rewrites as a plan for ``apply``."""
        from rewriter.plan import plan_from_result

        return plan_from_result(
            self.result, input_sha256=self.input_sha256, pass_options=self.options.pass_options,
            output_sha256=output_sha256, feeds=self.feeds,
        )


def optimize_model(
    source: str | os.PathLike[str],
    options: OptimizeOptions,
    *,
    progress: AbstractContextManager[Any] | None = None,
) -> OptimizeOutcome:
    """Load a model file, run the guarded pipeline on it and apply the final gate; writes nothing.

    Bad options or an unusable model raise :class:`InputError`. ``progress`` is entered around the
    pipeline run (the CLI's progress line).
    """
    from rewriter import pipeline
    from rewriter.io import sha256_file
    from rewriter.model import Model
    from rewriter.gate import gate_failures
    from rewriter.validation.feeds import feedset_for, input_specs

    options.check()
    selected = options.build_passes()
    config = options.validation_config()
    if options.latency:
        config.runtime.providers()  # fail early on an unavailable provider
    input_sha = sha256_file(source)
    model = Model.from_source(source, options.input_shapes, max_bytes=options.max_model_bytes)
    feedset = feedset_for(
        input_specs(model.proto, model.input_shapes), feeds=options.feeds, images=options.images,
        image_spec=options.image_spec, count=options.num_feeds, seed=options.seed,
    )
    with progress if progress is not None else nullcontext():
        result = pipeline.optimize(model, selected, feeds=feedset, config=config, time_budget_s=options.time_budget, screen=options.screen,
                                   target_speedup=options.target_speedup)
    untried = sum(d.outcome is Outcome.NOT_TRIED_TIME for d in result.decisions)
    if untried:
        log.warning("validation time budget of %gs exhausted: %d candidate(s) not tried", options.time_budget, untried)
    if result.target_reached is False:
        log.warning("target speedup %gx not reached: %s", options.target_speedup,
                    result.final_latency.ci if result.final_latency is not None else "no rewrite was kept")
    gate = gate_failures(result, config, require_speedup=options.fail_if_no_speedup)
    return OptimizeOutcome(result, options, config, feedset, input_sha, gate)
