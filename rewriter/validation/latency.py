"""Interleaved A/B latency measurement in one process.

Both models run in deploy sessions built with the same :class:`RuntimeOptions`. After a warm-up, each
*pair* times one sample of A and one of B, alternating which goes first; a sample repeats ``session.run``
enough times to last at least ``min_sample_s`` so that timer and Python overhead do not dominate small
subgraphs. Pairs are collected until ``max_pairs`` or the time budget (never fewer than ``min_pairs``).

A measurement told which speedups decide its call (``settle``: the thresholds its caller compares the
interval with) stops as soon as the call is made: from ``min_pairs`` on, every few pairs, the paired bootstrap
interval at :data:`LOOK_CONFIDENCE` is computed, and once it lies wholly above every threshold or wholly below
every one, no more pairs are taken. The looks are sequential tests, so each is made at a stricter level than the
95% interval that is reported (six looks at 99% keep the chance of stopping on noise near 5%). A pair whose
speedup sits at a threshold still gets the whole budget.

Several jobs on one machine (``optimize-many``) must not time at the same moment: inside
:func:`timing_lock`, every measurement (:func:`time_pairs`, :func:`time_session`) holds the given lock
from its warm-up to its last sample. Outside it, measuring takes no lock.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rewriter.validation.stats import RatioCI, bootstrap_speedup


@dataclass(frozen=True)
class TimingOptions:
    warmup: int = 3
    min_pairs: int = 10
    max_pairs: int = 40
    time_budget_s: float = 3.0
    min_sample_s: float = 0.002
    seed: int = 0
    #: Stop taking pairs once the interval decides against the caller's thresholds (:func:`time_pairs`'s
    #: ``settle``); off: every comparison runs to ``max_pairs`` or its time budget.
    settle_early: bool = True


#: Warm-up pairs beyond the first are run only within this many seconds: a slow model is warm after one run
#: (its first allocates), and the two runs that size the samples follow it anyway.
WARMUP_S = 0.25

#: The confidence of the interval looked at while pairs are still being taken (:func:`time_pairs`'s ``settle``).
LOOK_CONFIDENCE = 0.99


def decided(a: Sequence[float], b: Sequence[float], settle: Sequence[float], seed: int = 0) -> bool:
    """Whether the speedup interval of the pairs so far (at :data:`LOOK_CONFIDENCE`) lies wholly above every
    threshold in ``settle`` or wholly below every one: the call they decide is made."""
    if not settle or len(a) < 2:
        return False
    ci = bootstrap_speedup(a, b, resamples=1000, confidence=LOOK_CONFIDENCE, seed=seed)
    return ci.low > max(settle) or ci.high < min(settle)


@dataclass(frozen=True)
class LatencyComparison:
    base_median_s: float
    candidate_median_s: float
    ci: RatioCI
    repeats_per_sample: int
    #: The paired per-run times behind the figures (for :func:`pooled`); not reported.
    samples: tuple[tuple[float, ...], tuple[float, ...]] | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, float | int]:
        return {
            "base_median_ms": self.base_median_s * 1e3,
            "candidate_median_ms": self.candidate_median_s * 1e3,
            "speedup": self.ci.speedup,
            "ci_low": self.ci.low,
            "ci_high": self.ci.high,
            "pairs": self.ci.pairs,
            "repeats_per_sample": self.repeats_per_sample,
        }


_LOCK: ContextVar[AbstractContextManager[Any] | None] = ContextVar("rewriter_timing_lock", default=None)


@contextmanager
def timing_lock(lock: AbstractContextManager[Any]) -> Iterator[None]:
    """Within this block (this thread or task), each latency measurement holds ``lock`` while it runs.

    ``lock`` is entered once per measurement, so it must be reusable (``threading.Lock``, a
    ``multiprocessing`` lock, :class:`rewriter.validation.locks.MachineLock`).
    """
    token = _LOCK.set(lock)
    try:
        yield
    finally:
        _LOCK.reset(token)


def _measuring() -> AbstractContextManager[Any]:
    return _LOCK.get() or nullcontext()


def session_feed(feed: Mapping[str, np.ndarray], session) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    """The part of ``feed`` that ``session`` takes as inputs."""
    names = {i.name for i in session.get_inputs()}
    return {k: v for k, v in feed.items() if k in names}


def _sample(session, names, feed, repeats: int) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    for _ in range(repeats):
        session.run(names, feed)
    return (time.perf_counter() - start) / repeats


def time_pairs(base_session, candidate_session, feed: Mapping[str, np.ndarray], opts: TimingOptions,  # type: ignore[no-untyped-def]
               settle: Sequence[float] = ()) -> LatencyComparison:
    """Interleaved timing of two ready sessions on one feed; with ``settle``, stopped once the interval decides
    against those thresholds (module docstring)."""
    feed_a, feed_b = session_feed(feed, base_session), session_feed(feed, candidate_session)
    names_a = [o.name for o in base_session.get_outputs()]
    names_b = [o.name for o in candidate_session.get_outputs()]
    a: list[float] = []
    b: list[float] = []
    with _measuring():
        warm = time.perf_counter() + WARMUP_S
        for i in range(max(1, opts.warmup)):  # one pair at least; more while they are quick
            if i and time.perf_counter() > warm:
                break
            base_session.run(names_a, feed_a)
            candidate_session.run(names_b, feed_b)
        first = (_sample(base_session, names_a, feed_a, 1), _sample(candidate_session, names_b, feed_b, 1))
        repeats = max(1, math.ceil(opts.min_sample_s / max(*first, 1e-7)))
        deadline = time.perf_counter() + opts.time_budget_s
        i = 0
        if repeats == 1:  # runs long enough to be samples themselves: the pair that sized them is the first pair
            a.append(first[0])
            b.append(first[1])
            i = 1
        look = max(2, opts.min_pairs)
        step = max(2, opts.min_pairs // 2)
        while len(a) < opts.max_pairs and (len(a) < opts.min_pairs or time.perf_counter() < deadline):
            if len(a) >= look:
                if opts.settle_early and decided(a, b, settle, opts.seed):
                    break
                look += step
            if i % 2 == 0:
                a.append(_sample(base_session, names_a, feed_a, repeats))
                b.append(_sample(candidate_session, names_b, feed_b, repeats))
            else:
                b.append(_sample(candidate_session, names_b, feed_b, repeats))
                a.append(_sample(base_session, names_a, feed_a, repeats))
            i += 1
    ci = bootstrap_speedup(a, b, seed=opts.seed)
    return LatencyComparison(float(np.median(a)), float(np.median(b)), ci, repeats, (tuple(a), tuple(b)))


def pooled(first: LatencyComparison, second: LatencyComparison, seed: int = 0) -> LatencyComparison:
    """One comparison from the pairs of two measurements of the same two sessions (per-run times, so
    samples of different repeat counts pool)."""
    if first.samples is None or second.samples is None:
        raise ValueError("pooled() needs comparisons that kept their samples")
    a = first.samples[0] + second.samples[0]
    b = first.samples[1] + second.samples[1]
    ci = bootstrap_speedup(a, b, seed=seed)
    return LatencyComparison(float(np.median(a)), float(np.median(b)), ci, max(first.repeats_per_sample, second.repeats_per_sample), (a, b))


@dataclass(frozen=True)
class LatencyProfile:
    median_s: float
    p05_s: float
    p95_s: float
    runs: int

    def to_dict(self) -> dict[str, float | int]:
        return {"median_ms": self.median_s * 1e3, "p05_ms": self.p05_s * 1e3, "p95_ms": self.p95_s * 1e3, "runs": self.runs}


def time_session(session, feed: Mapping[str, np.ndarray], runs: int, warmup: int = 3) -> LatencyProfile:  # type: ignore[no-untyped-def]
    """Median and 5th/95th percentiles of ``runs`` timed runs of one session."""
    feed = session_feed(feed, session)
    names = [o.name for o in session.get_outputs()]
    with _measuring():
        for _ in range(warmup):
            session.run(names, feed)
        times = np.array([_sample(session, names, feed, 1) for _ in range(max(1, runs))])
    p05, med, p95 = np.quantile(times, [0.05, 0.5, 0.95])
    return LatencyProfile(float(med), float(p05), float(p95), int(times.size))
