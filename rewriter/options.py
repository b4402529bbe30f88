"""Option sets as plain, picklable values, named and defaulted as on the command line.

Each set is what one of the CLI's option groups builds, and what :class:`~rewriter.job.OptimizeOptions`
is made of (it inherits their fields):

- :class:`FeedOptions`: where the feeds come from (files, an image folder, or seeded random feeds);
  :meth:`FeedOptions.feedset` builds the :class:`~rewriter.validation.feeds.FeedSet`.
- :class:`BudgetOptions`: how far outputs may move (``--max-error``, the exact gate's tolerances), the
  task metric, and the precision searched within that budget (``--precision``).
- :class:`MeasureOptions`: whether and how latency is measured (provider, deployment profiles -- threads and
  batch --, thresholds, pairs).
- :class:`SearchOptions`: which passes run, the time budget and the speedup target.

:func:`validation_config` is the one place a judge's
:class:`~rewriter.validation.judge.ValidationConfig` is built from these values.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from rewriter.errors import InputError
from rewriter.shapes import Shape
from rewriter.validation.feeds import FeedSet
from rewriter.validation.judge import ValidationConfig


@dataclass(frozen=True)
class FeedOptions:
    """The feeds a model is judged on: user files, an image folder, or seeded random feeds."""

    #: ``.npy``/``.npz`` files of inputs.
    feeds: tuple[str, ...] = ()
    #: A folder of images (needs ``image_spec``).
    images: str | None = None
    image_spec: str | None = None
    #: A data-loader script (``file.py`` or ``file.py:function``) yielding feeds.
    data_loader_script: str | None = None
    #: How many random feeds, when no files or images are given.
    num_feeds: int = 8
    seed: int = 0
    #: The share of user data held out as the test split the search never sees (0: none; random feeds have none).
    holdout_fraction: float = 0.25

    def feedset(self, model: Any, input_shapes: Mapping[str, Shape] | None = None) -> FeedSet:
        """Feeds for ``model`` (a :class:`~rewriter.model.Model`): an image folder, user files or a data-loader
        script (split into calibration, validation and the held-out test split), else seeded random ones."""
        from rewriter.validation.feeds import feedset_for, input_specs

        shapes = model.require_shapes() if input_shapes is None else input_shapes
        return feedset_for(
            input_specs(model.proto, shapes), feeds=self.feeds, images=self.images, image_spec=self.image_spec,
            data_loader=self.data_loader_script, count=self.num_feeds, seed=self.seed, holdout_fraction=self.holdout_fraction,
        )


@dataclass(frozen=True)
class BudgetOptions:
    """What a rewrite may change: the lossy budget, the exact gate's tolerances, and the task metric."""

    #: Budget of lossy passes, e.g. ``cosine>=0.999,top1-drop<=0.01`` (``None``: the default budget).
    max_error: str | None = None
    rtol: float = 1e-4
    atol: float = 1e-5
    #: Task metric as ``module:function`` (or ``file.py:function``), higher is better.
    metric: str | None = None
    max_metric_drop: float = 0.01
    min_metric: float | None = None
    #: Run a sharded metric's map over this Ray cluster (``auto``, ``ray://host:10001``, ...).
    metric_ray_address: str | None = None
    #: ``fp32`` (nothing changes) or ``int8``: the guarded int8 stage after the structure passes
    #: (:mod:`rewriter.precision.stage`; needs real data and a lossy ``max_error``).
    precision: str = "fp32"


@dataclass(frozen=True)
class MeasureOptions:
    """Whether and how latency is measured."""

    latency: bool = True
    subgraph: bool = True
    threads: int = 1
    provider: str = "cpu"
    min_speedup: float = 1.0
    exact_min_speedup: float = 0.99
    max_pairs: int = 40
    #: The validation feeds a run of exact passes proves its result on (0: all of them).
    exact_feeds: int = 2
    #: The batch of the timed and numerics feeds (the first dim of every input).
    batch: int = 1
    #: Deployment profiles as ``threads=T,batch=B``, the primary first (instead of ``threads``/``batch``).
    profiles: tuple[str, ...] = ()

    def deployments(self) -> tuple[Any, ...]:
        """The :class:`~rewriter.validation.deployment.DeploymentProfile` s latency is judged on, primary first."""
        from rewriter.validation.deployment import profiles_from

        return profiles_from(self.threads, self.batch, self.profiles)

    def runtime(self) -> Any:
        """The deploy sessions' :class:`~rewriter.validation.runtime.RuntimeOptions` (the primary profile's threads)."""
        from rewriter.validation.runtime import RuntimeOptions

        return RuntimeOptions(provider=self.provider, threads=self.deployments()[0].threads)


@dataclass(frozen=True)
class SearchOptions:
    """Which passes run, and when the search stops."""

    #: Comma-separated pass names, or ``None`` for every exact pass.
    passes: str | None = None
    time_budget: float | None = None
    #: Screen lossy passes before judging (see rewriter.search).
    screen: bool = True
    #: Stop lossy passes once the whole model is measured this much faster (CI lower bound).
    target_speedup: float | None = None
    fail_if_no_speedup: bool = False
    #: When the held-out test split breaks the budget: fail the gate instead of backing off (see rewriter.holdout).
    holdout_fail: bool = False


def validation_config(budget: BudgetOptions, measure: MeasureOptions) -> ValidationConfig:
    """The judge's configuration; imports the metric (a usage error if it cannot be loaded)."""
    from rewriter.validation.judge import TaskMetric, load_metric
    from rewriter.validation.latency import TimingOptions
    from rewriter.validation.numerics import Budget

    runtime = measure.runtime()
    metric = None
    if budget.metric is not None:
        fn = load_metric(budget.metric)
        if budget.metric_ray_address is not None:
            from rewriter.validation.sharded import on_ray

            fn = on_ray(fn, budget.metric_ray_address, runtime=runtime, name=f"--metric {budget.metric!r}")
        metric = TaskMetric(fn, budget.max_metric_drop, budget.metric, budget.min_metric)
    elif budget.metric_ray_address is not None:
        raise InputError("--metric-ray-address needs --metric")
    return ValidationConfig(
        budget=Budget.parse(budget.max_error, rtol=budget.rtol, atol=budget.atol),
        runtime=runtime,
        latency=measure.latency,
        subgraph_latency=measure.subgraph,
        exact_min_speedup=measure.exact_min_speedup,
        exact_feeds=measure.exact_feeds,
        lossy_min_speedup=measure.min_speedup,
        timing=TimingOptions(max_pairs=measure.max_pairs, min_pairs=min(10, measure.max_pairs)),
        metric=metric,
        profiles=measure.deployments() if measure.profiles or measure.batch != 1 else (),
    )
