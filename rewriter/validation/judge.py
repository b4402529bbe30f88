"""The judge: decides whether one rewrite is kept.

Numerics are always measured against the *original* model's reference outputs (computed once, graph
optimizations disabled), so lossy rewrites share one budget and errors cannot silently add up. Latency is
measured against the *currently accepted* model: on the touched region alone (fast path) when it can be
extracted, else end to end.

Decision rules (thresholds are options):

* exact rewrite: kept when numerics hold at ``rtol``/``atol`` and the speedup CI does not lie wholly below
  ``exact_min_speedup`` (0.99 by default: not shown slower, with a 1% margin for timer noise);
* an exact rewrite that lowers neither MACs nor the node count (see :func:`speculative`) is judged on
  latency like a lossy one;
* lossy rewrite: kept when the budget holds, the task metric (if any) has not dropped more than allowed,
  and the speedup CI lies wholly above ``lossy_min_speedup`` (a speedup shown with 95% confidence).
"""

from __future__ import annotations

import inspect
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any

import onnx

from rewriter.contract import Candidate
from rewriter.deadline import Deadline
from rewriter.errors import InputError
from rewriter.io.proto import weight_bytes
from rewriter.model import Model
from rewriter.outcome import Outcome
from rewriter.validation.background import OVERLAP_BYTES, Worker, result_or_none
from rewriter.validation.calibration import with_outputs
from rewriter.validation.deployment import DeploymentProfile, rows, shapes_at
from rewriter.validation.feeds import FeedSet, input_specs
from rewriter.validation.latency import LatencyComparison, TimingOptions, time_pairs
from rewriter.validation.numerics import Budget, OutputStats, spread_error
from rewriter.validation.region import RegionError, extract_region, region_feed, region_outputs
from rewriter.memory import give_back_memory
from rewriter.validation.runtime import RuntimeOptions, deploy_session, eval_session, reference_session, run_feeds
from rewriter.validation.stats import RatioCI
from rewriter.validation.user_code import import_function

log = logging.getLogger(__name__)

MetricFn = Callable[[Any], float]


def takes_split(fn: Callable[..., Any]) -> bool:
    """Whether a metric function takes a ``split`` keyword (see :meth:`TaskMetric.score`)."""
    try:
        param = inspect.signature(fn).parameters.get("split")
    except (TypeError, ValueError):
        return False
    return param is not None and param.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


@dataclass(frozen=True)
class TaskMetric:
    """A user's task metric: ``fn(session) -> float`` (higher is better), the drop it may suffer against
    the original model, and optionally a floor it must stay at or above.

    A function with a ``split`` keyword (``fn(session, split="validation")``) scores the data it is told:
    ``"validation"`` for every measurement of the search, ``"test"`` for the held-out confirmation after it
    (:mod:`rewriter.holdout`), which must be data the search never scored. Without the keyword it scores the
    same data each time, and the confirmation cannot check it on unseen data."""

    fn: MetricFn
    max_drop: float = float("inf")
    name: str = "metric"
    min_value: float | None = None

    @property
    def takes_split(self) -> bool:
        return takes_split(self.fn)

    def score(self, session: Any, split: str = "validation") -> float:
        """The metric of ``session`` on ``split`` (``"validation"`` or ``"test"``; a function without the
        ``split`` keyword is called with the session alone)."""
        return float(self.fn(session, split=split) if self.takes_split else self.fn(session))

    def failure(self, baseline: float, value: float) -> str | None:
        """Why ``value`` fails this metric's gate, or ``None``."""
        drop = baseline - value
        if drop > self.max_drop:
            return f"{self.name} dropped by {drop:.4g} ({baseline:.6g} -> {value:.6g}; allowed {self.max_drop:g})"
        if self.min_value is not None and value < self.min_value:
            return f"{self.name} = {value:.6g} is below its floor {self.min_value:g}"
        return None

    def spend(self, baseline: float, value: float) -> float:
        """The share of this metric's budget ``value`` uses (1: at the edge): ``drop / max_drop`` and, with a
        floor, ``drop / (baseline - floor)`` -- the larger."""
        drop, worst = baseline - value, 0.0
        if math.isfinite(self.max_drop) and self.max_drop > 0:
            worst = drop / self.max_drop
        if self.min_value is not None:
            room = baseline - self.min_value
            worst = max(worst, drop / room if room > 0 else (0.0 if value >= self.min_value else math.inf))
        return worst


def load_metric(spec: str) -> MetricFn:
    """Import ``module:function`` (the module may also be a path to a ``.py`` file)."""
    return import_function(spec, "--metric")


@dataclass(frozen=True)
class ValidationConfig:
    budget: Budget = field(default_factory=Budget)
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    timing: TimingOptions = field(default_factory=TimingOptions)
    #: Measure latency at all (off: numerics-only gating).
    latency: bool = True
    #: Time the touched region alone for each rewrite (fast path); off: end to end.
    subgraph_latency: bool = True
    #: Exact rewrites are rolled back when the CI lies wholly below this: a 1% margin keeps timer noise
    #: and drift from undoing rewrites that are as fast as before.
    exact_min_speedup: float = 0.99
    lossy_min_speedup: float = 1.0
    metric: TaskMetric | None = None
    #: A run of exact passes only is proven once, on its result (numerics and latency end to end), and searched
    #: again round by round only where the result fails (:func:`rewriter.pipeline.optimize`); off: every round and
    #: pass is proven and timed as the search goes.
    defer_exact: bool = True
    #: The validation feeds such a run's result is proven on (the first ones; 0: all of them). Its error is
    #: rounding, the same on any input; where the result fails, the search again round by round uses them all.
    exact_feeds: int = 2
    #: The deployment profiles latency must pay on, the primary first (its threads are ``runtime.threads``);
    #: empty: the one profile of ``runtime.threads`` on the feeds as they are (the model's resolved batch).
    profiles: tuple[DeploymentProfile, ...] = ()

    @property
    def deployments(self) -> tuple[DeploymentProfile, ...]:
        """The profiles latency is judged on, primary first (never empty)."""
        return self.profiles or (DeploymentProfile(max(1, self.runtime.threads), 1),)


@dataclass(frozen=True)
class ProfileLatency:
    """One latency comparison at one deployment profile, with its scope (``subgraph`` or ``model``)."""

    profile: DeploymentProfile
    latency: LatencyComparison
    scope: str

    def to_dict(self) -> dict[str, Any]:
        return {**self.profile.to_dict(), "scope": self.scope, **self.latency.to_dict()}


@dataclass(frozen=True)
class Verdict:
    keep: bool
    reason: str
    numerics: dict[str, OutputStats]
    latency: LatencyComparison | None = None
    latency_scope: str | None = None  # "subgraph" | "model" | "round" | "result" | "deferred" (not yet judged)
    metric: float | None = None
    seconds: float = 0.0
    #: What the verdict means for the candidate: ``KEPT``, or the check that refused it.
    outcome: Outcome = Outcome.KEPT
    #: Latency at each deployment profile measured, primary first (empty with a single profile).
    profiles: tuple[ProfileLatency, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "keep": self.keep,
            "outcome": self.outcome.value,
            "reason": self.reason,
            "numerics": {k: v.to_dict() for k, v in self.numerics.items()},
            "latency": None if self.latency is None else {"scope": self.latency_scope, **self.latency.to_dict()},
            "metric": self.metric,
            "seconds": round(self.seconds, 4),
            "profiles": [p.to_dict() for p in self.profiles],
        }


#: What a deferred exact rewrite waits for (:attr:`Judge.deferred`); replaced by the figures once the result is judged.
DEFERRED = "judged with the whole result"


def _compute_nodes(model: Model) -> int:
    return sum(1 for n in model.proto.graph.node if n.op_type != "Constant")


def speculative(accepted: Model, trial: Model, candidate: Candidate) -> bool:
    """An exact rewrite that lowers neither estimated MACs nor the number of compute nodes.

    Nothing but a measurement can say it pays, so it is judged like a lossy one: kept only when shown
    faster. (Folding a BN lowers the node count; fusing two convs lowers MACs; turning a conv into
    Flatten + Gemm + Reshape lowers neither.)
    """
    if candidate.cost.macs_after < candidate.cost.macs_before:
        return False
    return _compute_nodes(trial) >= _compute_nodes(accepted)



def _small(proto: onnx.ModelProto) -> bool:
    """Whether the model is small enough for its proof work to overlap the search (:data:`OVERLAP_BYTES`)."""
    return weight_bytes(proto) <= OVERLAP_BYTES

class Judge:
    """Holds the original model's reference outputs and judges rewrites against them."""

    def __init__(self, original: Model, feeds: FeedSet | None = None, config: ValidationConfig | None = None,
                 deadline: Deadline | None = None) -> None:
        self.original = original
        config = config or ValidationConfig()
        budget = config.budget.for_model(original.proto)  # a float16 model's exact gate is wider
        self.config = config if budget is config.budget else replace(config, budget=budget)
        #: The run's time budget (unbounded by default): what the judge's own extra measurements may spend.
        self.deadline = deadline or Deadline()
        #: Exact rewrites are kept without numerics of their own -- and those that lower MACs or nodes without a
        #: timing of their own -- both judged later on the whole result, end to end (:func:`rewriter.pipeline.optimize`
        #: sets it for a run of exact passes only, and searches again one by one where the result fails).
        self.deferred = False
        feeds = feeds or FeedSet.random(input_specs(original.proto, original.require_shapes()))
        #: With profiles, numerics run at the primary profile's batch (the validation and test feeds re-batched to it).
        self.feeds = feeds.rebatched(self.config.profiles[0].batch) if self.config.profiles else feeds
        if not self.feeds.validation:
            raise InputError("no validation feeds")
        self._timing_feeds: dict[int, dict] = {}
        self._deployed: dict[int, tuple[onnx.ModelProto, Future[str | None]]] = {}
        self._last_numerics: tuple[onnx.ModelProto, int, dict[str, OutputStats]] | None = None
        self._shaped: dict[int, tuple[Model, Model]] = {}
        self._reference: list[dict] | None = None
        self._reference_error: str | None = None
        self._metric_base: float | None = None
        self._error_reference: list[dict] | None = None
        #: Where proof work that times nothing runs ahead of need (:mod:`~rewriter.validation.background`).
        #: A model over :data:`OVERLAP_BYTES`: its proof work waits to be asked for, and the run collects what the
        #: search left in cycles before the closing's sessions.
        self.big = not _small(original.proto)
        self.worker = Worker(overlap=not self.big)
        self._lock = threading.RLock()  # the reference outputs
        self._deployed_lock = threading.Lock()

    # -- reference ------------------------------------------------------------------------------------
    def reference_error(self) -> str | None:
        """Why the original model cannot be run for reference outputs (warned once), or ``None``."""
        if self._reference is None and self._reference_error is None:
            try:
                self._reference_upto(len(self.proof_feeds()))
            except InputError as exc:
                self._reference_error = str(exc)
                log.warning("no rewrite can be validated, the model is left as it is: %s", exc)
        return self._reference_error

    def proof_feeds(self) -> list[dict]:
        """The validation feeds :meth:`numerics` runs on: all of them, or -- in a run proven on its result
        (:attr:`deferred`) -- the first ``config.exact_feeds``. An exact rewrite's error is rounding, the same
        on any input; more feeds add run time, not evidence (a lossy rewrite's error depends on the data:
        every feed)."""
        return self.feeds.validation[:self._proof_count(self.deferred)]

    def _proof_count(self, exact_only: bool) -> int:
        k = self.config.exact_feeds
        return min(k, len(self.feeds.validation)) if exact_only and k else len(self.feeds.validation)

    @property
    def reference(self) -> list[dict]:
        """The original's outputs on every validation feed (optimizations disabled)."""
        return self._reference_upto(len(self.feeds.validation))

    def _reference_upto(self, n: int) -> list[dict]:
        """The reference outputs of the first ``n`` validation feeds (computed as first needed, then kept)."""
        with self._lock:  # (the worker may be computing them: wait for it rather than run them twice)
            have = self._reference or []
            if len(have) < n:
                have = have + run_feeds(reference_session(self.original.proto), self.feeds.validation[len(have):n])
                self._reference = have
                give_back_memory()
            return have if len(have) == n else have[:n]

    def prefetch(self, exact_only: bool) -> None:
        """Start the original's part of the proof on the worker: its reference outputs on the feeds numerics
        will use and -- in a run of exact passes only, with latency judged -- its deployed graph
        (:meth:`same_deployed`). Every timing waits for them first."""
        self.worker.submit(self._reference_upto, self._proof_count(exact_only), light=True)
        if exact_only and self.config.latency:
            self.deployed_soon(self.original.proto)

    @property
    def metric_baseline(self) -> float | None:
        if self.config.metric is None:
            return None
        if self._metric_base is None:
            self._metric_base = self.metric_value(self.original.proto)
        return self._metric_base

    # -- measurements ---------------------------------------------------------------------------------
    def numerics(self, proto: onnx.ModelProto, session=None) -> dict[str, OutputStats]:  # type: ignore[no-untyped-def]
        """Outputs on the validation feeds against the reference; by default run with optimizations
        disabled (the exact gate; the last such result is kept, so a model proven once -- a round's -- is not
        run again for the closing check), or in the given session (lossy rewrites reuse their deploy session)."""
        feeds = self.proof_feeds()
        last = self._last_numerics
        if session is None and last is not None and last[0] is proto and last[1] == len(feeds):
            return dict(last[2])
        if session is not None:
            return self.config.budget.compare(self._reference_upto(len(feeds)), run_feeds(session, feeds))
        outputs = run_feeds(reference_session(proto), feeds)  # the session is freed here ...
        give_back_memory()  # ... and its pages returned
        stats = self.config.budget.compare(self._reference_upto(len(feeds)), outputs)
        self._last_numerics = (proto, len(feeds), stats)
        return stats

    def metric_value(self, proto: onnx.ModelProto, session=None) -> float:  # type: ignore[no-untyped-def]
        assert self.config.metric is not None
        return self.config.metric.score(session if session is not None else eval_session(proto, self.config.runtime), "validation")

    def deployed_soon(self, proto: onnx.ModelProto) -> Future[str | None]:
        """Start reading the graph onnxruntime deploys for ``proto`` on the worker, unless it is under way; its
        task (for :meth:`same_deployed`; the last two are kept)."""
        from rewriter.validation.deployed import deployed_key

        with self._deployed_lock:
            hit = self._deployed.get(id(proto))
            if hit is None or hit[0] is not proto:
                hit = (proto, self.worker.submit(deployed_key, proto, self.config.runtime))
                self._deployed = {**dict(list(self._deployed.items())[-1:]), id(proto): hit}  # no more models kept alive
            return hit[1]

    def same_deployed(self, base: onnx.ModelProto, candidate: onnx.ModelProto) -> bool:
        """Whether onnxruntime runs the same graph for both (:mod:`~rewriter.validation.deployed`): then they
        take the same time by construction, at every profile, and are not timed."""
        first = result_or_none(self.deployed_soon(base))  # (None when it cannot be had: then only a timing tells)
        return first is not None and first == result_or_none(self.deployed_soon(candidate))

    def _profile(self, profile: DeploymentProfile | None) -> DeploymentProfile:
        return self.config.deployments[0] if profile is None else profile

    def _runtime(self, profile: DeploymentProfile) -> RuntimeOptions:
        """The deploy sessions' options at ``profile``: its threads where the run has profiles, else the run's own."""
        return replace(self.config.runtime, threads=profile.threads) if self.config.profiles else self.config.runtime

    def timing_feed(self, batch: int) -> dict:
        """The feed latency is timed on at ``batch``: the first ``batch`` rows of the validation feeds (without
        profiles: the first validation feed as it is)."""
        if not self.config.profiles:
            return self.feeds.validation[0]
        if batch not in self._timing_feeds:
            self._timing_feeds[batch] = rows(self.feeds.validation, batch)
        return self._timing_feeds[batch]

    @property
    def settle(self) -> tuple[float, float]:
        """The speedups every latency call of this judge is made against (an exact rewrite's "not slower", a
        lossy one's "faster"): a timing whose interval lies wholly on one side of both stops early."""
        return (self.config.exact_min_speedup, self.config.lossy_min_speedup)

    def model_latency(self, base: onnx.ModelProto, candidate: onnx.ModelProto,
                      profile: DeploymentProfile | None = None) -> LatencyComparison:
        """Whole-model timing of ``candidate`` against ``base`` at ``profile`` (default: the primary one)."""
        self.worker.quiet()  # nothing runs beside a timing
        p = self._profile(profile)
        rt = self._runtime(p)
        lat = time_pairs(deploy_session(base, rt), deploy_session(candidate, rt), self.timing_feed(p.batch), self.config.timing,
                         self.settle)
        give_back_memory()
        return lat

    def shaped(self, accepted: Model, batch: int) -> Model:
        """``accepted`` with its inputs' first dim at ``batch`` (for the shapes of a region timed at that batch);
        ``accepted`` itself where it already is, or when the run has no profiles (timed as resolved). The last one
        per batch is kept."""
        shapes = shapes_at(accepted.input_shapes, batch)
        if not self.config.profiles or shapes == accepted.input_shapes:
            return accepted
        hit = self._shaped.get(batch)
        if hit is None or hit[0] is not accepted:
            hit = (accepted, Model(accepted.proto, shapes))
            self._shaped[batch] = hit
        return hit[1]

    def region_latency(self, accepted: Model, trial: Model, candidate: Candidate,
                       profile: DeploymentProfile | None = None) -> LatencyComparison:
        """Timing of the touched region alone, before and after, at ``profile`` (default: the primary one)."""
        self.worker.quiet()  # nothing runs beside a timing
        p = self._profile(profile)
        outputs = region_outputs(accepted, candidate.nodes)
        if not outputs:
            raise RegionError("the region has no outputs")
        known = self.shaped(accepted, p.batch)
        before = extract_region(accepted, outputs, candidate.nodes, known)
        after = extract_region(trial, outputs, candidate.nodes, known)
        feed = region_feed((before, after), known, seed=self.config.timing.seed)
        rt = self._runtime(p)
        return time_pairs(deploy_session(before.model, rt), deploy_session(after.model, rt), feed, self.config.timing, self.settle)

    # -- quick error measurement (screening) ----------------------------------------------------------
    def error_tensors(self) -> list[str]:
        """Where :meth:`error` looks: each graph output, or -- when a Softmax, LogSoftmax or Sigmoid makes
        it -- that node's input, the logits (probabilities near 0 or 1 hide how far the scores moved)."""
        graph = self.original.proto.graph
        producers = {out: n for n in graph.node for out in n.output}
        names = []
        for out in graph.output:
            node = producers.get(out.name)
            squash = node is not None and node.op_type in ("Softmax", "LogSoftmax", "Sigmoid") and len(node.input) == 1
            names.append(node.input[0] if squash else out.name)  # type: ignore[union-attr]
        return list(dict.fromkeys(names))

    def error(self, trial: Model) -> float:
        """How far ``trial`` strays from the original on the validation feeds, relative to how much the
        original's outputs vary across them (:func:`~rewriter.validation.numerics.spread_error` on
        :meth:`error_tensors`): a quick measurement -- no budget, no latency -- that predicts what a lossy
        rewrite will cost before it is judged."""
        names = self.error_tensors()

        def run(model: Model) -> list[dict]:
            session = eval_session(with_outputs(model, names, self.original), self.config.runtime)
            return [dict(zip(names, session.run(names, dict(feed)))) for feed in self.feeds.validation]

        if self._error_reference is None:
            self._error_reference = run(self.original)
        return spread_error(self._error_reference, run(trial))

    # -- the decision ---------------------------------------------------------------------------------
    def judge(self, accepted: Model, trial: Model, candidate: Candidate, exact: bool,
              proven: Mapping[str, OutputStats] | None = None) -> Verdict:
        """Keep or roll back ``trial`` (``accepted`` with ``candidate`` applied): numerics against the
        original, the task metric (lossy), then latency against ``accepted``. ``proven``: exact rewrites
        only -- the numerics of a model that holds this rewrite and the others of its round, already
        within the exact budget (:meth:`Judge.numerics` is then not run again). An exact rewrite that lowers
        neither MACs nor the node count (:func:`speculative`) is timed first: it is refused far more often
        for latency than for numerics, and a refused one needs no numerics run."""
        start = time.perf_counter()
        cfg = self.config
        if proven is not None and not exact:
            raise ValueError("judge: only exact rewrites can be proven with their round")
        needs_speedup = speculative(accepted, trial, candidate) if exact else True
        if exact and self.deferred and cfg.latency and not needs_speedup:
            return Verdict(True, f"exact: numerics and latency {DEFERRED}", {}, seconds=time.perf_counter() - start,
                           latency_scope="deferred")
        measured: list[ProfileLatency] = []
        if exact and needs_speedup and proven is None and cfg.latency:
            measured, refusal = self._time_profiles(accepted, trial, candidate, exact, needs_speedup)
            if refusal is not None:
                return self._refused(refusal, {}, measured, None, start)
            if self.deferred:
                first = measured[0]
                return Verdict(True, f"exact, {first.scope} speedup {first.latency.ci}; numerics {DEFERRED}", {}, first.latency,
                               first.scope, seconds=time.perf_counter() - start, profiles=self._all(measured))
        # Lossy budgets dwarf onnxruntime's own rounding: judge them in one session with the deploy options
        # (on every core: numerics, not timing), reused below.
        session = None if exact else eval_session(trial.proto, cfg.runtime)
        stats = dict(proven) if proven is not None else self.numerics(trial.proto, session)
        problems = cfg.budget.failures(stats, exact)
        if problems:
            return Verdict(False, "numerics: " + "; ".join(problems), stats, seconds=time.perf_counter() - start,
                           outcome=Outcome.NUMERICS)
        metric = None
        if cfg.metric is not None and not exact:
            metric = self.metric_value(trial.proto, session)
            why = cfg.metric.failure(self.metric_baseline or 0.0, metric)
            if why is not None:
                return Verdict(False, why, stats, metric=metric, seconds=time.perf_counter() - start, outcome=Outcome.METRIC)
        if not cfg.latency:
            within = "numerics within budget" if proven is None else "numerics proven with its round"
            return Verdict(True, f"{within} (latency not measured)", stats, metric=metric, seconds=time.perf_counter() - start)
        if not measured:
            measured, refusal = self._time_profiles(accepted, trial, candidate, exact, needs_speedup)
            if refusal is not None:
                return self._refused(refusal, stats, measured, metric, start)
        first = measured[0]
        how = ("exact" if proven is None else "exact (numerics proven with its round)") if exact else "within budget"
        others = "".join(f"; {m.profile.label}: {m.scope} speedup {m.latency.ci}" for m in measured[1:])
        return Verdict(True, f"{how}, {first.scope} speedup {first.latency.ci}{others}", stats, first.latency, first.scope,
                       metric, time.perf_counter() - start, profiles=self._all(measured))

    def _time_profiles(self, accepted: Model, trial: Model, candidate: Candidate, exact: bool,
                       needs_speedup: bool) -> tuple[list[ProfileLatency], str | None]:
        """The rewrite timed at each profile, primary first, stopping at the first it does not pay at; with why."""
        measured: list[ProfileLatency] = []
        many = len(self.config.deployments) > 1
        for profile in self.config.deployments:  # a rewrite refused at one profile is not timed at the next
            lat, scope = self._latency(accepted, trial, candidate, profile)
            measured.append(ProfileLatency(profile, lat, scope))
            refusal = self._latency_refusal(lat.ci, exact, needs_speedup, scope)
            if refusal is not None:
                return measured, refusal + (f" at {profile.label}" if many else "")
        return measured, None

    def _refused(self, reason: str, stats: dict[str, OutputStats], measured: list[ProfileLatency], metric: float | None,
                 start: float) -> Verdict:
        return Verdict(False, reason, stats, measured[0].latency, measured[0].scope, metric, time.perf_counter() - start,
                       Outcome.LATENCY, self._all(measured))

    def _all(self, measured: list[ProfileLatency]) -> tuple[ProfileLatency, ...]:
        return tuple(measured) if len(self.config.deployments) > 1 else ()

    def _latency(self, accepted: Model, trial: Model, candidate: Candidate,
                 profile: DeploymentProfile) -> tuple[LatencyComparison, str]:
        """The rewrite's latency against ``accepted`` at ``profile``: its region alone when it can be extracted
        (and ``subgraph_latency`` is on), else the whole model; with the scope used."""
        if self.config.subgraph_latency:
            try:
                return self.region_latency(accepted, trial, candidate, profile), "subgraph"
            except (RegionError, InputError) as exc:
                log.info("%s: region timing unavailable (%s); timing the whole model", candidate.pass_name, exc)
        return self.model_latency(accepted.proto, trial.proto, profile), "model"

    def _latency_refusal(self, ci: RatioCI, exact: bool, needs_speedup: bool, scope: str) -> str | None:
        """Why a rewrite's speedup ``ci`` does not pay, or ``None``: an exact rewrite must not be shown slower
        than ``exact_min_speedup``; a lossy one -- or an exact one that lowers neither MACs nor the node
        count (``needs_speedup``) -- must be shown faster than ``lossy_min_speedup``."""
        cfg = self.config
        if exact and not needs_speedup:
            return f"slower: {scope} speedup {ci}" if ci.slower(cfg.exact_min_speedup) else None
        if ci.faster(cfg.lossy_min_speedup):
            return None
        if exact:
            return f"lowers neither MACs nor node count, and no speedup shown: {scope} speedup {ci}"
        return f"no speedup shown: {scope} speedup {ci} (needs CI above {cfg.lossy_min_speedup:g})"
