"""One guarded optimization of one model file: what ``optimize`` and each ``optimize-many`` job run.

:class:`OptimizeOptions` holds every option of the run as plain, picklable values (pass names, paths,
numbers, a ``module:function`` metric spec; the option sets of :mod:`rewriter.options` and a few more),
so the same options can be handed to a worker process or a Ray task. :func:`optimize_model` loads the model, judges every candidate and applies the final gate; it
writes nothing. The caller writes the model, the plan and the report (:meth:`OptimizeOutcome.report`,
:meth:`OptimizeOutcome.plan`), so that where the files go is its business. The feeds are made only when a
candidate has to be judged: a model with nothing to rewrite needs none (nor resolved input shapes) and
passes through unchanged.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from rewriter import pipeline  # module attribute: tests replace pipeline.optimize
from rewriter.contract import Pass
from rewriter.decision import Decision
from rewriter.errors import InputError
from rewriter.gate import gate_failures
from rewriter.io import sha256_file
from rewriter.model import Model
from rewriter.options import BudgetOptions, FeedOptions, MeasureOptions, SearchOptions, validation_config
from rewriter.outcome import Outcome
from rewriter.pipeline import OptimizeResult
from rewriter.plan import Plan, plan_from_result
from rewriter.report import build_report
from rewriter.shapes import Shape, input_shape_notes
from rewriter.validation.feeds import FeedSet
from rewriter.validation.judge import ValidationConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OptimizeOptions(MeasureOptions, BudgetOptions, FeedOptions, SearchOptions):
    """The options of one guarded optimization, named and defaulted as on the command line: the fields of
    the option sets in :mod:`rewriter.options` and the ones below."""

    #: Keyword options per pass (a config file's ``[pass-options.NAME]`` tables).
    pass_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    input_shapes: dict[str, Shape] = field(default_factory=dict)
    max_model_bytes: int | None = None
    external_data: bool | None = None

    @classmethod
    def compose(cls, *parts: Any, **values: Any) -> OptimizeOptions:
        """Options made of option sets (:class:`~rewriter.options.FeedOptions`, ...) and further values by name."""
        merged: dict[str, Any] = {}
        for part in parts:
            merged.update({f.name: getattr(part, f.name) for f in fields(part)})
        return cls(**merged, **values)

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
        self.check_precision()

    def check_precision(self) -> None:
        """``--precision int8`` needs real data (int8 is calibrated and proven on it) and a lossy budget."""
        if self.precision not in ("fp32", "int8"):
            raise InputError(f"--precision must be fp32 or int8, not {self.precision!r}")
        if self.precision == "int8" and not (self.feeds or self.images or self.data_loader_script):
            raise InputError("--precision int8 needs real data (--images, --feeds or --data-loader-script): random feeds are not data")
        if self.precision == "int8" and not self.max_error:
            raise InputError("--precision int8 needs a lossy budget (--max-error, e.g. cosine>=0.999): int8 is never exact")

    def precision_options(self) -> Any:
        """The int8 stage's :class:`~rewriter.precision.stage.PrecisionOptions`, or ``None`` for fp32."""
        from rewriter.precision.stage import PrecisionOptions

        return PrecisionOptions() if self.precision == "int8" else None

    def build_passes(self) -> list[Pass]:
        from rewriter.config import build_passes

        return build_passes(self.passes, self.pass_options)

    def validation_config(self) -> ValidationConfig:
        """The judge's configuration; imports the metric (a usage error if it cannot be loaded)."""
        return validation_config(self, self)


class _FeedsOnDemand:
    """The run's feed set, made the first time the pipeline asks for it (and kept in :attr:`made`)."""

    def __init__(self, make: Callable[[], FeedSet]) -> None:
        self._make = make
        self.made: FeedSet | None = None

    def __call__(self) -> FeedSet:
        if self.made is None:
            self.made = self._make()
        return self.made


@dataclass
class OptimizeOutcome:
    """A finished run, before anything is written: the result, what it was judged with, and the gate."""

    result: OptimizeResult
    options: OptimizeOptions
    config: ValidationConfig
    #: The feeds the run was judged on; ``None`` when nothing had to be judged.
    feeds: FeedSet | None
    input_sha256: str
    #: The final gate's failures; empty when the output may be written.
    gate: list[str]
    #: Dims the run took by default (a symbolic batch dim as 1): :func:`rewriter.shapes.input_shape_notes`.
    input_shape_notes: list[dict[str, Any]] = field(default_factory=list)

    def report(self, input_path: str, output_path: str | None, output_sha256: str | None) -> dict[str, Any]:
        """The JSON report (schema version 7); the output is recorded only when the gate passed."""
        return build_report(
            self.result, input_path=input_path, input_sha256=self.input_sha256,
            output_path=None if self.gate else output_path, output_sha256=output_sha256,
            provider=self.options.provider, threads=self.config.runtime.threads, batch=self._batch(), profiles=self.config.profiles or None, gate=self.gate,
            pass_options=self.options.pass_options, input_shape_notes=self.input_shape_notes,
        )

    def _batch(self) -> int:
        """The batch the run was judged at: the primary profile's, else the first input's resolved first dim."""
        if self.config.profiles:
            return self.config.profiles[0].batch
        shapes = [s for s in self.result.input_shapes.values() if len(s)]
        return int(shapes[0][0]) if shapes and int(shapes[0][0]) > 0 else 1

    def plan(self, output_sha256: str | None) -> Plan:
        """The kept rewrites as a plan for ``apply``."""
        return plan_from_result(
            self.result, input_sha256=self.input_sha256, pass_options=self.options.pass_options,
            output_sha256=output_sha256, feeds=self.feeds,
        )


def optimize_model(
    source: str | os.PathLike[str],
    options: OptimizeOptions,
    *,
    progress: AbstractContextManager[Any] | None = None,
    on_decision: Callable[[Decision, Model], None] | None = None,
    on_round: Callable[[str, int], None] | None = None,
) -> OptimizeOutcome:
    """Load a model file, run the guarded pipeline on it and apply the final gate; writes nothing.

    Bad options or an unusable model raise :class:`InputError`. ``progress`` is entered around the
    pipeline run (the CLI's progress line); ``on_decision`` and ``on_round`` are the pipeline's callbacks
    (:func:`rewriter.pipeline.optimize`) that drive it.
    """
    options.check()
    selected = options.build_passes()
    config = options.validation_config()
    if options.latency:
        config.runtime.providers()  # fail early on an unavailable provider
    input_sha = sha256_file(source)
    model = Model.from_source(source, options.input_shapes, max_bytes=options.max_model_bytes, defer_unresolved=True)
    feeds = _FeedsOnDemand(lambda: options.feedset(model))
    with progress if progress is not None else nullcontext():
        result = pipeline.optimize(model, selected, feeds=feeds, config=config, time_budget_s=options.time_budget, screen=options.screen,
                                   target_speedup=options.target_speedup, holdout_fail=options.holdout_fail,
                                   on_decision=on_decision, on_round=on_round, precision=options.precision_options())
    untried = sum(d.outcome is Outcome.NOT_TRIED_TIME for d in result.decisions)
    if untried:
        log.warning("validation time budget of %gs exhausted: %d candidate(s) not tried", options.time_budget, untried)
    if result.target_reached is False:
        log.warning("target speedup %gx not reached: %s", options.target_speedup,
                    result.final_latency.ci if result.final_latency is not None else "no rewrite was kept")
    gate = gate_failures(result, config, require_speedup=options.fail_if_no_speedup)
    notes = input_shape_notes(model.proto, options.input_shapes)
    return OptimizeOutcome(result, options, config, feeds.made, input_sha, gate, notes)
