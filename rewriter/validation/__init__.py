"""Validation: feeds, numerics against a reference, latency A/B with confidence intervals, the judge."""

from rewriter.validation.feeds import FeedSet, ImageSpec, InputSpec, input_specs, load_array_feeds, load_image_feeds, random_feeds, split_feeds
from rewriter.validation.judge import Judge, TaskMetric, ValidationConfig, Verdict, load_metric
from rewriter.validation.latency import LatencyComparison, TimingOptions, time_pairs, time_session
from rewriter.validation.numerics import Bound, Budget, OutputStats, compare_outputs, parse_bounds
from rewriter.validation.runtime import RuntimeOptions, deploy_session, reference_session, run_feeds
from rewriter.validation.stats import RatioCI, bootstrap_speedup

__all__ = [
    "Bound",
    "Budget",
    "FeedSet",
    "ImageSpec",
    "InputSpec",
    "Judge",
    "LatencyComparison",
    "OutputStats",
    "RatioCI",
    "RuntimeOptions",
    "TaskMetric",
    "TimingOptions",
    "ValidationConfig",
    "Verdict",
    "bootstrap_speedup",
    "compare_outputs",
    "deploy_session",
    "input_specs",
    "load_array_feeds",
    "load_image_feeds",
    "load_metric",
    "parse_bounds",
    "random_feeds",
    "reference_session",
    "run_feeds",
    "split_feeds",
    "time_pairs",
    "time_session",
]
