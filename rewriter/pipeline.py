"""The guarded pipeline: find, apply one, judge, keep or roll back, repeat; then confirm end to end.

For each pass, candidates are tried in order of estimated MACs saved. Each is applied to a fork of the
accepted model and judged (numerics against the original model, latency against the accepted one). A
candidate that raises is rolled back and recorded, never fatal. When a pass accepted anything, the whole
model is timed against the model from before the pass; if that shows the pass did not pay, the pass is
undone and its decisions say so. :func:`apply_pass` is the unguarded counterpart for the Python API and
for tests.

Lossy passes are screened before judging and tried by MACs saved per predicted squared error (see
:mod:`rewriter.search`). A candidate whose nodes the same pass already replaced -- a stronger variant of a
conv factorized mildly before -- is re-expressed by the pass (:meth:`Pass.refresh`) and judged in its turn
as a replacement; the earlier decision is then marked superseded.

Exact passes prove a round's candidates together: all of them are applied to one fork and its numerics
checked once (:class:`RoundProof`); within the exact budget, each candidate is then judged on latency
alone, in turn. Where the round fails, each candidate is proven alone, as lossy ones are. (Rewrites later
rolled back for latency leave a model the round did not prove; the closing end-to-end numerics and the
gate check it.)

With a ``target_speedup``, lossy passes stop once the whole model is measured that much faster than the
original (lower bound of the 95% CI): the rest of the error budget is left unspent (:class:`Target`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import onnx

from rewriter.analysis import Analysis, analyze
from rewriter.contract import Candidate, Pass, RewriteError, Skip
from rewriter.model import Model
from rewriter.registry import resolve_passes
from rewriter.search import SCREEN_SHARE, Screening, rank, screen_candidates
from rewriter.shapes import Shape
from rewriter.validation.calibration import Calibration
from rewriter.validation.feeds import FeedSet
from rewriter.validation.judge import Judge, ValidationConfig, Verdict
from rewriter.validation.latency import LatencyComparison, pooled
from rewriter.validation.numerics import OutputStats

log = logging.getLogger(__name__)

Source = str | os.PathLike[str] | onnx.ModelProto | Model


def _as_model(source: Source, input_shapes: Mapping[str, Shape] | None, max_bytes: int | None = None) -> Model:
    if isinstance(source, Model):
        if input_shapes and dict(input_shapes) != source.input_shapes:
            return Model.from_source(source.proto, input_shapes)
        return source
    return Model.from_source(source, input_shapes, max_bytes=max_bytes)


@dataclass(frozen=True)
class Decision:
    """What happened to one candidate."""

    candidate: Candidate
    exact: bool
    kept: bool
    reason: str
    verdict: Verdict | None = None
    screening: Screening | None = None
    #: Kept, then replaced by a later kept rewrite of the nodes it made (not in the output model as such).
    superseded: bool = False


@dataclass
class PassRun:
    """One pass's part of the run."""

    name: str
    exact: bool
    kept: int = 0
    rolled_back: int = 0
    skips: list[Skip] = field(default_factory=list)
    model_latency: LatencyComparison | None = None
    reverted: str | None = None


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
    def changed(self) -> bool:
        return bool(self.kept)


def _note_replaced(decisions: list[Decision], created: dict[str, int], cand: Candidate, index: int, before: Model, after: Model) -> None:
    """Record which nodes the kept decision ``index`` made; where it replaced only nodes that earlier kept
    decisions made (a stronger variant in place of a milder one), say so in their reasons (they stay kept:
    a plan replays them in order, and the later one rewrites their nodes)."""
    earlier = {created[n] for n in cand.nodes if n in created}
    if earlier and all(n in created for n in cand.nodes):
        for j in sorted(earlier):
            decisions[j] = replace(decisions[j], reason=f"{decisions[j].reason}; later replaced by: {cand.description}", superseded=True)
    old = {n.name for n in before.proto.graph.node}
    for n in after.proto.graph.node:
        if n.name not in old:
            created[n.name] = index


#: Extra whole-model measurements, pooled with the first, when its interval and its point estimate disagree.
CONFIRMATIONS = 2


def _settled(judge: Judge, base: Model, model: Model, threshold: float, exact: bool, first: LatencyComparison | None = None) -> LatencyComparison:
    """The whole-model comparison a pass is kept or undone on. Where the interval leaves the call open
    while the point estimate takes a side (a noisy machine), more pairs are measured and pooled, up to
    ``CONFIRMATIONS`` times: one unlucky measurement must not undo a whole search. ``first``: a
    measurement of this very pair already taken (it is not repeated)."""
    lat = first if first is not None else judge.model_latency(base.proto, model.proto)
    for _ in range(CONFIRMATIONS):
        ci = lat.ci
        open_call = (not ci.slower(threshold) and ci.speedup < threshold) if exact else (not ci.faster(threshold) and ci.speedup > threshold)
        if not open_call:
            break
        log.info("whole-model speedup %s is not settled; measuring more pairs", ci)
        lat = pooled(lat, judge.model_latency(base.proto, model.proto), seed=judge.config.timing.seed)
    return lat


@dataclass
class Target:
    """A lossy search's progress towards ``target_speedup``, with few whole-model measurements.

    After each kept lossy rewrite its measured saving (base minus candidate median of its verdict's
    timing: the region's, or the whole model's) is added up, and the whole model is measured against the
    original only when the last such measurement, shortened by the savings since, predicts the target:
    ``T_orig / (T_last - sum(saved)) * low/median of the last interval >= target``. The first kept
    rewrite is always measured (there is no ``T_orig`` before). Reached when a measured interval's lower
    bound is at or above the target.
    """

    speedup: float
    last: LatencyComparison | None = None
    model: Model | None = None  # the model ``last`` measured
    saved_s: float = 0.0
    reached: bool = False

    def predicted_low(self) -> float | None:
        """The predicted lower bound of the current model's speedup, or ``None`` before any measurement."""
        if self.last is None:
            return None
        left = self.last.candidate_median_s - self.saved_s
        if left <= 0.0:
            return float("inf")
        return self.last.base_median_s / left * (self.last.ci.low / self.last.ci.speedup)

    def after_kept(self, verdict: Verdict | None, judge: Judge, original: Model, model: Model) -> None:
        """Account for one kept rewrite (``model`` is the model with it); measure when the target is predicted."""
        lat = verdict.latency if verdict is not None else None
        if lat is not None:
            self.saved_s += max(0.0, lat.base_median_s - lat.candidate_median_s)
        predicted = self.predicted_low()
        if predicted is not None and predicted < self.speedup:
            return
        self.last = judge.model_latency(original.proto, model.proto)
        self.model, self.saved_s = model, 0.0
        self.reached = self.last.ci.low >= self.speedup
        log.info("target %gx: whole model at %s after a kept rewrite%s", self.speedup, self.last.ci, " (reached)" if self.reached else "")


def _record_skips(run: PassRun, found: Sequence[Candidate | Skip]) -> None:
    seen = {(s.nodes, s.reason) for s in run.skips}
    for s in found:
        if isinstance(s, Skip) and (s.nodes, s.reason) not in seen:
            run.skips.append(s)
            seen.add((s.nodes, s.reason))


def _accuracy_failure(verdict: Verdict) -> bool:
    """Rejected for numerics or the task metric (not for latency)."""
    return not verdict.keep and verdict.latency is None


@dataclass(frozen=True)
class RoundProof:
    """An exact pass's round proven together: every candidate applied in turn (each to the model the one
    before made, as the one-by-one path does while it keeps them all), and the numerics of the result."""

    numerics: dict[str, OutputStats]
    order: tuple[str, ...]  # candidate keys, in the order applied

    def covers(self, kept: Sequence[str], key: str) -> bool:
        """Whether the one-by-one path, having kept ``kept`` this round, is about to build the next model of
        the proof (so far it built the same ones)."""
        n = len(kept)
        return n < len(self.order) and self.order[n] == key and tuple(kept) == self.order[:n]


def _prove_round(p: Pass, model: Model, todo: Sequence[Candidate], judge: Judge, deadline: float | None = None) -> RoundProof | None:
    """Apply every candidate of an exact pass's round in turn (skipping those whose nodes an earlier one
    consumed) and check the result's numerics once. ``None`` when the result fails the exact budget, a
    rewrite raises, the ``deadline`` passes, or there is nothing to share (fewer than two candidates):
    they are then proven alone."""
    if not p.exact or len(todo) < 2 or judge.reference_error() is not None:
        return None
    current, order = model, []
    try:
        for cand in todo:
            if deadline is not None and time.perf_counter() > deadline:
                return None
            if any(current.node(n) is None for n in cand.nodes):
                continue
            trial = current.fork()
            p.apply(trial, cand)
            current = trial.commit()
            order.append(cand.key)
        if len(order) < 2:
            return None
        stats = judge.numerics(current.proto)
    except Exception as exc:  # the one-by-one path records which rewrite fails, and why
        log.info("%s: round of %d not proven together (%s: %s); proving each alone", p.name, len(todo), type(exc).__name__, exc)
        return None
    failures = judge.config.budget.failures(stats, exact=True)
    if failures:
        log.info("%s: round of %d rewrites fails together (%s); proving each alone", p.name, len(order), "; ".join(failures))
        return None
    log.info("%s: %d rewrites proven exact together", p.name, len(order))
    return RoundProof(stats, tuple(order))


def _try(p: Pass, accepted: Model, candidate: Candidate, judge: Judge, proven: dict[str, OutputStats] | None = None) -> tuple[Model | None, Decision]:
    trial = accepted.fork()
    try:
        p.apply(trial, candidate)
        committed = trial.commit()
    except RewriteError as exc:
        return None, Decision(candidate, p.exact, False, f"stale: {exc}")
    except Exception as exc:  # a faulty pass must never end the run
        log.warning("%s raised on %s: %s", p.name, candidate.nodes, exc)
        return None, Decision(candidate, p.exact, False, f"rewrite raised {type(exc).__name__}: {exc}")
    try:
        verdict = judge.judge(accepted, committed, candidate, p.exact, proven)
    except Exception as exc:
        log.warning("validation of %s on %s failed: %s", p.name, candidate.nodes, exc)
        return None, Decision(candidate, p.exact, False, f"validation failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    decision = Decision(candidate, p.exact, verdict.keep, verdict.reason, verdict)
    return (committed if verdict.keep else None), decision


def optimize(
    source: Source,
    passes: str | Sequence[str | Pass] | None = None,
    *,
    input_shapes: Mapping[str, Shape] | None = None,
    feeds: FeedSet | None = None,
    config: ValidationConfig | None = None,
    max_rounds: int = 8,
    time_budget_s: float | None = None,
    max_model_bytes: int | None = None,
    on_decision: Callable[[Decision, Model], None] | None = None,
    judge: Judge | None = None,
    screen: bool = True,
    target_speedup: float | None = None,
) -> OptimizeResult:
    """Run the guarded pipeline on a model path, proto or :class:`Model`; the source is never modified.

    ``passes``: names, instances, or ``None`` for the exact defaults. ``time_budget_s`` caps the whole
    call (search and closing end-to-end measurements, give or take one candidate); candidates left when
    it runs out are recorded as not tried. ``on_decision`` is called
    after each judged candidate with the decision and the model accepted after it (progress, sweeps).
    ``judge``: a ready :class:`Judge` of this very source model, whose reference outputs are then reused.
    ``screen``: measure lossy families before judging and order by predicted error (see the module
    docstring); with a ``time_budget_s``, screening stops at ``SCREEN_SHARE`` of it.
    ``target_speedup``: lossy passes stop once the whole model is measured at least this much faster
    than the source (CI lower bound; see :class:`Target`); needs latency measurement.
    """
    start = time.perf_counter()
    config = config or ValidationConfig()
    if target_speedup is not None and not target_speedup > 1.0:
        raise ValueError(f"optimize: target_speedup must be above 1, not {target_speedup!r}")
    if target_speedup is not None and not config.latency:
        raise ValueError("optimize: target_speedup needs latency measurement (config.latency)")
    target = None if target_speedup is None else Target(target_speedup)
    selected = resolve_passes(passes)
    original = _as_model(source, input_shapes, max_model_bytes)
    if judge is None:
        judge = Judge(original, feeds, config)
    elif judge.original is not original:
        raise ValueError("optimize: the judge was built for another model")
    aware = [p for p in selected if p.data_aware]
    cal = None
    if aware:
        if judge.feeds.synthetic or not judge.feeds.calibration:
            log.warning("lossy passes without calibration data fall back to weight-only fits; give --feeds or --images")
        else:
            cal = Calibration(original, judge.feeds.calibration)
    for p in aware:
        p.use_calibration(cal)
    model = original
    decisions: list[Decision] = []
    runs: list[PassRun] = []
    # The budget covers the whole call: leave room for the closing end-to-end comparisons (one after the
    # pass, one final; each about the timing budget plus a second of set-up) and start no candidate that would, at the slowest
    # pace of the last few judged, end past the deadline.
    closing = 2 * (config.timing.time_budget_s + 1.0) if config.latency else 0.0
    deadline = None if time_budget_s is None else start + max(0.0, time_budget_s - closing)
    paces: list[float] = []
    measured: tuple[Model, LatencyComparison] | None = None
    for p in selected:
        run = PassRun(p.name, p.exact)
        runs.append(run)
        before_pass = model
        first_decision = len(decisions)
        tried: set[str] = set()
        failed_levels: dict[str, float] = {}  # family -> lowest level that failed numerics
        families: dict[str, tuple[float, Candidate] | None] = {}  # screened family -> (error, measured variant)
        created: dict[str, int] = {}  # node name -> the decision whose rewrite made it
        screened: dict[str, Screening] = {}
        find_seconds = 0.0
        for round_index in range(max_rounds):
            if target is not None and target.reached and not p.exact:
                if round_index == 0:
                    run.skips.append(Skip(p.name, (), f"not run: target speedup {target.speedup:g}x already reached"))
                break
            if deadline is not None and decisions[first_decision:] and time.perf_counter() + find_seconds + max(paces[-8:], default=0.0) > deadline:
                break  # no time for another find and one candidate: a new round could only list them as not tried
            log.debug("%s: round %d at %.1f s", p.name, round_index + 1, time.perf_counter() - start)
            began_find = time.perf_counter()
            try:
                found = list(p.find(model))
            except Exception as exc:
                log.warning("%s.find raised: %s", p.name, exc)
                run.skips.append(Skip(p.name, (), f"find raised {type(exc).__name__}: {exc}"))
                break
            find_seconds = time.perf_counter() - began_find
            _record_skips(run, found)
            todo = [c for c in found if isinstance(c, Candidate) and c.key not in tried]
            if not todo:
                break
            if screen and not p.exact and judge.reference_error() is None:
                stop_at = None if time_budget_s is None else start + SCREEN_SHARE * time_budget_s
                screened = screen_candidates(p, model, todo, judge, families, stop_at)
                log.info("%s: %d families screened; %d candidates with a predicted error", p.name, len(families), len(screened))
            todo = rank(todo, screened)
            round_proof = _prove_round(p, model, todo, judge, deadline)
            round_kept: list[str] = []
            changed = False
            for cand in todo:
                prediction = screened.get(cand.key)
                if any(model.node(n) is None for n in cand.nodes):
                    # consumed by an earlier rewrite this round: the pass may re-express it (a stronger
                    # variant replacing a milder one it kept), else it is found afresh next round
                    fresh = p.refresh(model, cand)
                    if fresh is None or fresh.key in tried or any(model.node(n) is None for n in fresh.nodes):
                        continue
                    tried.add(cand.key)
                    cand = fresh
                tried.add(cand.key)
                if target is not None and target.reached and not p.exact:
                    decisions.append(Decision(cand, p.exact, False, f"not tried: target speedup {target.speedup:g}x reached ({target.last.ci if target.last else ''})"))
                    continue
                pace = max(paces[-8:], default=0.0)
                if deadline is not None and time.perf_counter() + pace > deadline:
                    decisions.append(Decision(cand, p.exact, False, "not tried: validation time budget exhausted"))
                    continue
                unusable = judge.reference_error()
                if unusable is not None:
                    decisions.append(Decision(cand, p.exact, False, f"not tried: no rewrite can be validated ({unusable})"))
                    continue
                if cand.family is not None and cand.level >= failed_levels.get(cand.family, float("inf")):
                    decisions.append(Decision(cand, p.exact, False, "not tried: a milder variant already failed the numerics budget"))
                    continue
                began = time.perf_counter()
                # The round's proof holds while this path builds the same models (after a rollback or a
                # refreshed candidate the rest are proven alone).
                proven = round_proof.numerics if round_proof is not None and round_proof.covers(round_kept, cand.key) else None
                accepted, decision = _try(p, model, cand, judge, proven)
                if prediction is not None:
                    decision = replace(decision, screening=prediction)
                paces.append(time.perf_counter() - began)
                decisions.append(decision)
                if on_decision is not None:
                    on_decision(decision, accepted if accepted is not None else model)
                if not decision.kept and cand.family is not None and decision.verdict is not None and _accuracy_failure(decision.verdict):
                    failed_levels[cand.family] = min(cand.level, failed_levels.get(cand.family, float("inf")))
                log.info("%s %s: %s", "kept" if decision.kept else "rolled back", cand.description, decision.reason)
                if accepted is not None:
                    _note_replaced(decisions, created, cand, len(decisions) - 1, model, accepted)
                    model, changed = accepted, True
                    round_kept.append(cand.key)
                    if target is not None and not p.exact:
                        target.after_kept(decision.verdict, judge, original, model)
            if not changed:
                break
        mine = decisions[first_decision:]
        if model is not before_pass and config.latency:
            threshold = config.exact_min_speedup if p.exact else config.lossy_min_speedup
            first = target.last if target is not None and target.model is model and before_pass is original else None
            lat = _settled(judge, before_pass, model, threshold, p.exact, first)
            run.model_latency = lat
            if before_pass is original:
                measured = (model, lat)  # the same pair the final comparison would time
            undo = lat.ci.slower(config.exact_min_speedup) if p.exact else not lat.ci.faster(config.lossy_min_speedup)
            if undo:
                run.reverted = f"whole-model speedup {lat.ci} does not pay; pass undone"
                log.info("%s: %s", p.name, run.reverted)
                model = before_pass
                if target is not None and not p.exact:
                    target.last, target.model, target.saved_s, target.reached = None, None, 0.0, False
                for i, d in enumerate(mine):
                    if d.kept:
                        decisions[first_decision + i] = replace(d, kept=False, reason=f"{d.reason}; {run.reverted}")
                mine = decisions[first_decision:]
        run.kept = sum(d.kept for d in mine)
        run.rolled_back = sum(not d.kept for d in mine)
    changed = model is not original
    if target is not None and target.model is model and target.last is not None and (measured is None or measured[0] is not model):
        measured = (model, target.last)  # the target check timed this very pair
    final_numerics = judge.numerics(model.proto) if changed else {}
    if changed and config.latency:
        final_latency = measured[1] if measured is not None and measured[0] is model else judge.model_latency(original.proto, model.proto)
    else:
        final_latency = None
    any_lossy = any(not p.exact for p in selected)
    return OptimizeResult(
        model=model.proto,
        original=original.proto,
        input_shapes=dict(original.input_shapes),
        decisions=decisions,
        passes=runs,
        before=analyze(original),
        after=analyze(model),
        final_numerics=final_numerics,
        final_latency=final_latency,
        budget=config.budget.describe(exact=not any_lossy),
        feeds=judge.feeds.source,
        seconds=time.perf_counter() - start,
        target_speedup=target_speedup,
    )


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
            trial = model.fork()
            try:
                pass_.apply(trial, cand)
            except RewriteError:
                continue
            model = trial.commit()
            applied.append(cand)
            progressed = True
        if not progressed:
            break
    return PassResult(model.proto, bool(applied), applied, skipped)
