"""The guarded pipeline: for each pass, search (find, try, judge, keep or roll back); then confirm end to end.

:func:`optimize` is a short driver: it loads the model, builds the judge and the run's
:class:`~rewriter.deadline.Deadline` once, hands both to a :class:`~rewriter.search.PassSearch` per pass
(which owns that pass's rounds, see :mod:`rewriter.search`), and closes with the end-to-end numerics and
latency of the result. :func:`apply_pass` is the unguarded counterpart for the Python API and for tests.

Nothing to rewrite needs no data: when the feeds are still to be made (``feeds`` a function, or ``None``
for random ones), the selected passes first look for a candidate (:func:`~rewriter.search.nothing_to_rewrite`);
where none has one, the model passes through unchanged and no feed is ever made -- a model with string
or sequence inputs, or dynamic dims, comes back as it was.

With a ``target_speedup``, lossy passes stop once the whole model is measured that much faster than the
original (lower bound of the 95% CI): the rest of the error budget is left unspent
(:class:`~rewriter.search.Target`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import onnx

from rewriter.analysis import Analysis, analyze
from rewriter.contract import Candidate, Pass, RewriteError, Skip
from rewriter.deadline import Deadline
from rewriter.decision import Decision, PassRun, SearchSummary, summarize
from rewriter.errors import InputError
from rewriter.holdout import Holdout, budget_spend, confirm
from rewriter.memory import give_back_memory
from rewriter.model import COLLECT_BYTES, Model
from rewriter.outcome import Outcome
from rewriter.precision.stage import PrecisionOptions, PrecisionResult, apply_stage
from rewriter.registry import resolve_passes
from rewriter.rounds import settled
from rewriter.screening import SCREEN_SHARE, rank
from rewriter.search import PassSearch, SearchState, Target, nothing_to_rewrite
from rewriter.shapes import Shape
from rewriter.trial import apply_candidate
from rewriter.validation.calibration import Calibration
from rewriter.validation.feeds import FeedSet
from rewriter.validation.deployment import check_batches
from rewriter.validation.judge import DEFERRED, Judge, ProfileLatency, ValidationConfig
from rewriter.validation.runtime import share, shared_payloads
from rewriter.validation.latency import LatencyComparison
from rewriter.validation.numerics import OutputStats

__all__ = ["Decision", "OptimizeResult", "Outcome", "PassResult", "PassRun", "Source", "apply_pass", "optimize"]

log = logging.getLogger(__name__)

Source = str | os.PathLike[str] | onnx.ModelProto | Model
#: The judging feeds: a set, a function making one when a candidate first needs judging, or ``None`` (random).
Feeds = FeedSet | Callable[[], FeedSet] | None


def _as_model(source: Source, input_shapes: Mapping[str, Shape] | None, max_bytes: int | None = None, *,
              defer_unresolved: bool = False) -> Model:
    if isinstance(source, Model):
        if input_shapes and dict(input_shapes) != source.input_shapes:
            model = Model.from_source(source.proto, input_shapes)
            model.normalized = source.normalized
            return model
        return source
    return Model.from_source(source, input_shapes, max_bytes=max_bytes, defer_unresolved=defer_unresolved)


@dataclass
class OptimizeResult:
    model: onnx.ModelProto
    original: onnx.ModelProto
    input_shapes: dict[str, Shape]
    decisions: list[Decision]
    passes: list[PassRun]
    before: Analysis
    after: Analysis
    final_numerics: dict[str, OutputStats]
    final_latency: LatencyComparison | None
    budget: str
    feeds: str
    seconds: float
    #: ``optimize``'s ``target_speedup``; ``None`` when none was asked for.
    target_speedup: float | None = None
    #: The export quirks normalized when the model was loaded (:mod:`rewriter.io.normalize`), one note each.
    normalized: tuple[str, ...] = ()
    #: The held-out confirmation (:mod:`rewriter.holdout`); ``None`` when the result was built without one.
    holdout: Holdout | None = None
    #: The end-to-end comparison at each deployment profile, primary first (empty with a single profile).
    profile_latency: list[ProfileLatency] = field(default_factory=list)
    #: onnxruntime runs the same graph for the output as for the input (every rewrite kept is one its optimizer
    #: makes anyway): the latency is the input's by construction and was not timed (``final_latency`` is None).
    same_deployed: bool = False
    #: How the exact rewrites' latency was proven in a run of exact passes only: ``"result"`` (once, on the whole
    #: result end to end), or why each round was timed after all; ``None``: as the search went (a run with lossy
    #: passes, without latency, or with nothing kept).
    exact_latency: str | None = None
    #: How many validation feeds the closing numerics (``final_numerics``) ran on: all of them, or -- a run of
    #: exact passes proven on its result -- ``ValidationConfig.exact_feeds`` (0: no closing check).
    numerics_feeds: int = 0
    #: What bound the search: every candidate judged, the error budget spent, the clock, or the target.
    search: SearchSummary | None = None
    #: The int8 stage (``precision=``; :mod:`rewriter.precision.stage`); ``None``: fp32, no stage ran.
    precision: PrecisionResult | None = None

    @property
    def nothing_to_rewrite(self) -> bool:
        """No selected pass had a candidate (and no int8 stage wrote int8): the model passed through as it was."""
        return not self.decisions and not (self.precision is not None and self.precision.kept)

    @property
    def target_reached(self) -> bool | None:
        """Whether the final end-to-end CI lies at or above the target (``None``: no target)."""
        if self.target_speedup is None:
            return None
        return self.final_latency is not None and self.final_latency.ci.low >= self.target_speedup

    @property
    def kept(self) -> list[Decision]:
        """Every kept decision, in order (what a plan replays)."""
        return [d for d in self.decisions if d.kept]

    @property
    def in_model(self) -> list[Decision]:
        """The kept decisions whose rewrites are in the output model (kept, not replaced later)."""
        return [d for d in self.decisions if d.kept and not d.superseded]

    @property
    def not_tried(self) -> list[Decision]:
        """The candidates never judged (out of time, target reached, ...)."""
        return [d for d in self.decisions if not d.tried]

    @property
    def rolled_back(self) -> list[Decision]:
        """The candidates tried and refused, or kept and undone with their pass."""
        return [d for d in self.decisions if d.tried and not d.kept]

    @property
    def changed(self) -> bool:
        return bool(self.kept) or (self.precision is not None and self.precision.kept)


def closing_reserve(config: ValidationConfig) -> float:
    """Seconds a time budget keeps back for the closing end-to-end comparisons (one after the pass, one
    final, at each deployment profile; each about the timing budget plus a second of set-up)."""
    return 2 * (config.timing.time_budget_s + 1.0) * len(config.deployments) if config.latency else 0.0


def _check_target(target_speedup: float | None, config: ValidationConfig) -> Target | None:
    if target_speedup is None:
        return None
    if not target_speedup > 1.0:
        raise ValueError(f"optimize: target_speedup must be above 1, not {target_speedup!r}")
    if not config.latency:
        raise ValueError("optimize: target_speedup needs latency measurement (config.latency)")
    return Target(target_speedup)


def _ready_judge(original: Model, judge: Judge | None, feeds: FeedSet | None, config: ValidationConfig, deadline: Deadline) -> Judge:
    """The run's judge (``judge`` when given: it must be of this very model), holding the run's deadline;
    it never holds the held-out test split."""
    if judge is None:
        return Judge(original, None if feeds is None else feeds.for_search(), config, deadline)  # never the test split
    if judge.original is not original:
        raise ValueError("optimize: the judge was built for another model")
    judge.deadline = deadline
    return judge


def _bind_calibration(selected: Sequence[Pass], judge: Judge, original: Model) -> None:
    """Hand data-aware passes the calibration service: activations on the calibration feeds when real
    ones were given, else ``None`` (each pass then falls back to what it can do without; a pass instance
    reused across runs never keeps an earlier run's data)."""
    aware = [p for p in selected if p.data_aware]
    if not aware:
        return
    calibration = None
    if judge.feeds.synthetic or not judge.feeds.calibration:
        log.warning("lossy passes without calibration data fall back to weight-only fits; give --feeds or --images")
    else:
        calibration = Calibration(original, judge.feeds.calibration)
    for p in aware:
        p.use_calibration(calibration)


#: A whole-model timing of a model against the original already taken: the model, and its comparisons at each
#: profile (primary first).
Measured = tuple[Model, list[ProfileLatency]]


def _closing(state: SearchState, model: Model, measured: Measured | None) -> tuple[dict[str, OutputStats], list[ProfileLatency], bool]:
    """The output model's end-to-end numerics and latency against the original at each deployment profile
    (a measurement of that very pair already taken -- the first pass's closing check, or the target's -- is
    reused; one that leaves open whether it is slower is pooled with more pairs, :func:`~rewriter.rounds.settled`),
    and whether onnxruntime runs the same graph for both (then nothing is timed)."""
    original, judge = state.original, state.judge
    if model is original:
        return {}, [], False
    target = state.target
    if target is not None and target.model is model and target.last is not None and (measured is None or measured[0] is not model):
        measured = (model, [ProfileLatency(judge.config.deployments[0], target.last, "model")])
    share(model.proto)  # serialized once for its numerics, deployed graph and timing
    asks_same = judge.config.latency and all(d.exact for d in state.decisions if d.kept and not d.superseded)
    if asks_same:
        judge.deployed_soon(model.proto)  # read on the worker while the numerics run
    numerics = judge.numerics(model.proto)
    if not judge.config.latency:
        return numerics, [], False
    if same_deployed(state, model):
        return numerics, [], True
    reuse = {m.profile: m.latency for m in measured[1]} if measured is not None and measured[0] is model else {}
    threshold = judge.config.exact_min_speedup
    return numerics, [ProfileLatency(p, settled(judge, original, model, threshold, True, reuse.get(p), p), "model")
                      for p in judge.config.deployments], False


def same_deployed(state: SearchState, model: Model) -> bool:
    """Whether onnxruntime runs the same graph for ``model`` as for the original (asked only when every rewrite
    kept in it is exact: a lossy one changes the graph): then the output's latency is the input's by
    construction and is not timed."""
    if any(not d.exact for d in state.decisions if d.kept and not d.superseded):
        return False
    return state.judge.same_deployed(state.original.proto, model.proto)


def _search(state: SearchState, selected: Sequence[Pass], max_rounds: int) -> tuple[Model, list[PassRun], Measured | None]:
    """Each pass's search in turn, closed end to end: the model left, the passes' runs, and the first pass's
    closing timing against the original (the very pair the final comparison would time, when it is the result)."""
    model, runs = state.original, []
    measured: Measured | None = None
    for p in selected:
        search = PassSearch(p, state)
        before_pass = model
        after_pass = search.search(model, max_rounds)
        model = search.close(before_pass, after_pass)
        runs.append(search.run)
        if before_pass is state.original and search.run.model_latency is not None:
            primary = ProfileLatency(state.judge.config.deployments[0], search.run.model_latency, "model")
            measured = (after_pass, search.run.profile_latency or [primary])
    return model, runs, measured


@dataclass
class _Searched:
    """What one search leaves: the model, the passes' runs, the held-out confirmation, the closing numerics and
    latency (at each profile), whether onnxruntime runs the same graph, and how exact latency was proven."""

    model: Model
    runs: list[PassRun]
    holdout: Holdout | None
    numerics: dict[str, OutputStats]
    latency: list[ProfileLatency]
    same: bool
    #: The analysis of ``model`` (taken before its graph view is released).
    after: Analysis
    exact_latency: str | None = None
    numerics_feeds: int = 0


def _searched(state: SearchState, selected: Sequence[Pass], max_rounds: int, feeds: FeedSet, holdout_fail: bool) -> _Searched:
    """The passes' searches, the held-out confirmation and the closing comparison."""
    model, runs, measured = _search(state, selected, max_rounds)
    model, holdout = confirm(state, model, runs, selected, feeds, fail=holdout_fail)
    after = analyze(model)  # (reads shapes, not weights) while the graph view is still built
    loaded = sum(m.release() for m in (state.original, model))  # the closing runs onnxruntime on the protos:
    # the graph views' weight copies need not be held, nor what the search left in cycles (~90 MB on ResNet-50)
    give_back_memory(collect=loaded >= COLLECT_BYTES or state.judge.big)
    numerics, final, same = _closing(state, model, measured)
    return _Searched(model, runs, holdout, numerics, final, same, after, numerics_feeds=len(state.judge.proof_feeds()) if numerics else 0)


def _deferred(state: SearchState, selected: Sequence[Pass], max_rounds: int, feeds: FeedSet, holdout_fail: bool) -> _Searched:
    """A run of exact passes only, proven once, on the result (group testing at the scale of the run).

    Every exact rewrite is kept without numerics of its own, and every one that lowers MACs or nodes without a
    timing of its own (:attr:`Judge.deferred`); rewrites that lower neither are still shown faster alone. The
    result is then checked against the original end to end: numerics within the exact budget and, at each
    profile, not slower -- the closing comparison every run makes anyway, so a run whose result holds pays for
    one numerics run and one timing in all. Where it holds, each deferred rewrite is credited with it; where it
    fails, the run is searched again from the original with every round proven and timed as it goes, which names
    and rolls back the failing rewrites (:mod:`rewriter.rounds`)."""
    judge = state.judge
    judge.deferred = True
    try:
        first = _searched(state, selected, max_rounds, feeds, holdout_fail)
        failed = _result_fails(judge, first)
    except Exception as exc:  # noqa: BLE001 -- a rewrite left a model onnxruntime cannot run: found one by one below
        first, failed = None, f"cannot be run ({type(exc).__name__}: {exc})"
    finally:
        judge.deferred = False
    if first is not None and failed is None:
        _credit(state.decisions, first)
        changed = [r for r in first.runs if r.kept]
        if len(changed) == 1:  # one pass made the result: its end-to-end check is the result's
            run = changed[0]
            run.same_deployed = first.same
            run.model_latency = first.latency[0].latency if first.latency else None
            run.profile_latency = list(first.latency) if len(first.latency) > 1 else []
        first.exact_latency = "result" if first.model is not state.original else None
        return first
    log.info("the result of the exact passes %s: searching again, each round proven and timed", failed)
    state.decisions.clear()
    state.out_of_time = False
    again = _searched(state, selected, max_rounds, feeds, holdout_fail)
    again.exact_latency = f"rounds: the result with every exact rewrite {failed}, so each round was proven and timed"
    return again


def _result_fails(judge: Judge, searched: _Searched) -> str | None:
    """Why the result of a deferred run fails the exact budget or is slower end to end, or ``None``."""
    failures = judge.config.budget.failures(searched.numerics, exact=True) if searched.numerics else []
    if failures:
        return "fails the exact budget (" + "; ".join(failures) + ")"
    many = len(searched.latency) > 1
    for p in searched.latency:
        if p.latency.ci.slower(judge.config.exact_min_speedup):
            return f"is slower end to end ({p.latency.ci}" + (f" at {p.profile.label})" if many else ")")
    return None


def _credit(decisions: list[Decision], searched: _Searched) -> None:
    """Give each kept decision judged with the whole result (:data:`~rewriter.validation.judge.DEFERRED`) the
    result's numerics, and -- where its latency waited too -- its end-to-end comparison."""
    many = len(searched.latency) > 1
    if searched.same:
        speed = "latency unchanged by construction: onnxruntime runs the same graph for the result as for the input (not timed)"
    elif searched.latency:
        speed = "end-to-end speedup " + "; ".join(f"{p.latency.ci}" + (f" at {p.profile.label}" if many else "") for p in searched.latency)
    else:
        speed = "latency not measured"
    text = f"proven with the whole result ({speed})"
    primary = searched.latency[0].latency if searched.latency else None
    for i, d in enumerate(decisions):
        v = d.verdict
        if not d.kept or v is None or DEFERRED not in v.reason:
            continue
        verdict = replace(v, reason=v.reason.replace(DEFERRED, text), numerics=dict(searched.numerics))
        if v.latency_scope == "deferred":
            verdict = replace(verdict, latency=primary, latency_scope="result" if primary is not None else None,
                              profiles=tuple(searched.latency) if many else ())
        decisions[i] = replace(d, reason=d.reason.replace(DEFERRED, text), verdict=verdict)


def _spent(state: SearchState, searched: _Searched, selected: Sequence[Pass]) -> float | None:
    """How much of a lossy run's error budget the result spends on the validation feeds (its worst term's
    fraction used, the task metric's drop included); ``None`` for a run of exact passes."""
    if all(p.exact for p in selected) or not searched.numerics:
        return None
    config, metric = state.judge.config, None
    lossy = [d for d in state.decisions if d.kept and not d.superseded and not d.exact and d.verdict is not None]
    if config.metric is not None and lossy and lossy[-1].verdict.metric is not None:  # type: ignore[union-attr]
        metric = (state.judge.metric_baseline or 0.0, lossy[-1].verdict.metric, config.metric)  # type: ignore[union-attr]
    return budget_spend(searched.numerics, config.budget, metric)


def _unchanged(original: Model, runs: list[PassRun], budget: str, deadline: Deadline, target_speedup: float | None) -> OptimizeResult:
    """The result of a run with nothing to rewrite: the model as given, no decision, nothing measured.

    Without resolved input shapes a pass that looked somewhere (a skip) may only have declined for want of
    them: the missing shape is then asked for (the one-line error naming the flag) rather than the model
    passed through as if there were nothing in it to rewrite."""
    if original.unresolved is not None and any(run.skips for run in runs):
        raise InputError(original.unresolved)
    log.info("nothing to rewrite: no selected pass has a candidate; the model passes through unchanged")
    analysis = analyze(original)
    return OptimizeResult(
        model=original.as_given(), original=original.proto, input_shapes=dict(original.input_shapes), decisions=[],
        passes=runs, before=analysis, after=analysis, final_numerics={}, final_latency=None, budget=budget,
        feeds="none (nothing to rewrite)", seconds=deadline.elapsed(), target_speedup=target_speedup,
        normalized=original.normalized,
    )


def _result(state: SearchState, done: _Searched, selected: Sequence[Pass], before: Analysis, budget: str,
            time_budget_s: float | None, target_speedup: float | None) -> OptimizeResult:
    """The run's :class:`OptimizeResult` from what its search left (``before``: the original's analysis)."""
    original, judge, deadline = state.original, state.judge, state.deadline
    model, final = done.model, done.latency
    return OptimizeResult(
        model=model.proto if model is not original else original.as_given(),
        original=original.proto,
        input_shapes=dict(original.input_shapes),
        decisions=state.decisions,
        passes=done.runs,
        before=before,
        after=done.after,
        final_numerics=done.numerics,
        final_latency=final[0].latency if final else None,
        budget=budget,
        feeds=judge.feeds.source,
        seconds=deadline.elapsed(),
        target_speedup=target_speedup,
        normalized=original.normalized,
        holdout=done.holdout,
        profile_latency=final if len(final) > 1 else [],
        same_deployed=done.same,
        exact_latency=done.exact_latency,
        numerics_feeds=done.numerics_feeds,
        search=summarize(state.decisions, _spent(state, done, selected), state.out_of_time, time_budget_s),
    )


def optimize(
    source: Source,
    passes: str | Sequence[str | Pass] | None = None,
    *,
    input_shapes: Mapping[str, Shape] | None = None,
    feeds: Feeds = None,
    config: ValidationConfig | None = None,
    max_rounds: int = 8,
    time_budget_s: float | None = None,
    max_model_bytes: int | None = None,
    on_decision: Callable[[Decision, Model], None] | None = None,
    on_round: Callable[[str, int], None] | None = None,
    judge: Judge | None = None,
    screen: bool = True,
    target_speedup: float | None = None,
    holdout_fail: bool = False,
    precision: PrecisionOptions | None = None,
) -> OptimizeResult:
    """Run the guarded pipeline on a model path, proto or :class:`Model`; the source is never modified.

    ``passes``: names, instances, or ``None`` for the exact defaults. ``feeds``: a feed set, a function
    making one (called once, when a candidate first needs judging: a model no selected pass has a
    candidate for is returned as it was, with no feed made), or ``None`` for seeded random feeds (made
    only when needed too). ``time_budget_s`` caps the whole call (search and closing end-to-end measurements,
    give or take one candidate); candidates left when it runs out are recorded as not tried. ``on_decision``
    is called after each judged candidate with the decision and the model accepted after it (progress,
    sweeps); ``on_round`` when a pass's round starts, with the pass's name and its number of candidates.
    ``judge``: a ready :class:`Judge` of this very source model, whose reference outputs are then reused.
    ``screen``: measure lossy families before judging and order by predicted error (see
    :mod:`rewriter.screening`); with a ``time_budget_s``, screening stops at ``SCREEN_SHARE`` of it.
    ``target_speedup``: lossy passes stop once the whole model is measured at least this much faster
    than the source (CI lower bound; see :class:`~rewriter.search.Target`); needs latency measurement.
    ``feeds.test`` (the held-out test split) is never seen by the search: the result is confirmed on it
    afterwards and lossy rewrites are backed off until it holds (:mod:`rewriter.holdout`); with
    ``holdout_fail`` nothing is backed off and ``result.holdout`` says it does not hold (the gate fails).
    ``precision``: the int8 stage on the result (:mod:`rewriter.precision.stage`); ``None``: fp32."""
    config = config or ValidationConfig()
    deadline = Deadline(time_budget_s, reserve_s=closing_reserve(config), screen_share=SCREEN_SHARE)
    target = _check_target(target_speedup, config)
    selected = resolve_passes(passes)
    lazy = judge is None and not isinstance(feeds, FeedSet) and precision is None  # feeds made only if needed
    original = _as_model(source, input_shapes, max_model_bytes, defer_unresolved=lazy)
    check_batches(original.proto, config.profiles)
    budget = config.budget.for_model(original.proto).describe(exact=all(p.exact for p in selected) and precision is None)
    if lazy:
        idle = nothing_to_rewrite(selected, original)
        if idle is not None:
            return _unchanged(original, idle, budget, deadline, target_speedup)
    if callable(feeds):
        feeds = feeds()  # a candidate has to be judged: the feeds are made now (each judge re-batches its own)
    judge = _ready_judge(original, judge, feeds, config, deadline)
    deferring = config.latency and config.defer_exact and all(p.exact for p in selected)
    with shared_payloads(original.proto):
        try:
            judge.prefetch(exact_only=deferring)  # the original's part of the proof, beside the analysis and search
            _bind_calibration(selected, judge, original)
            before = analyze(original)  # once: the original's graph view is built (its find) and released before the closing
            state = SearchState(original, judge, deadline, target, screen, on_decision, on_round)
            done = (_deferred if deferring else _searched)(state, selected, max_rounds, feeds if feeds is not None else judge.feeds, holdout_fail)
            result = _result(state, done, selected, before, budget, time_budget_s, target_speedup)
            if precision is not None:  # the int8 stage on the structure result, judged against the original
                apply_stage(result, feeds if feeds is not None else judge.feeds, judge, precision)
        finally:
            judge.worker.close()
    return result


@dataclass
class PassResult:
    """Result of :func:`apply_pass`: the model, whether it changed, and what was applied or skipped."""

    model: onnx.ModelProto
    modified: bool
    applied: list[Candidate]
    skipped: list[Skip]


def apply_pass(
    source: Source,
    p: Pass | str,
    *,
    input_shapes: Mapping[str, Shape] | None = None,
    max_rounds: int = 8,
) -> PassResult:
    """Apply every candidate of one pass, unguarded (no validation), to a fixed point.

    For exploring and testing passes; deployment use goes through :func:`optimize`.
    """
    (pass_,) = resolve_passes([p])
    model = _as_model(source, input_shapes)
    applied: list[Candidate] = []
    skipped: list[Skip] = []
    for _ in range(max_rounds):
        found = list(pass_.find(model))
        skipped.extend(s for s in found if isinstance(s, Skip) and s not in skipped)
        progressed = False
        for cand in rank([c for c in found if isinstance(c, Candidate)]):
            if any(model.node(n) is None for n in cand.nodes):
                continue
            try:
                model = apply_candidate(pass_, model, cand)
            except RewriteError:
                continue
            applied.append(cand)
            progressed = True
        if not progressed:
            break
    return PassResult(model.proto, bool(applied), applied, skipped)
