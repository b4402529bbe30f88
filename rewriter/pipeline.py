"""The guarded pipeline: find, apply one, judge, keep or roll back, repeat; then confirm end to end.

For each pass, candidates are tried in order of estimated MACs saved. Each is applied to a fork of the
accepted model and judged (numerics against the original model, latency against the accepted one). A
candidate that raises is rolled back and recorded, never fatal. When a pass accepted anything, the whole
model is timed against the model from before the pass; if that shows the pass did not pay, the pass is
undone and its decisions say so. :func:`apply_pass` is the unguarded counterpart for the Python API and
for tests.

Lossy passes spend one shared error budget, so their order decides how far a search gets. Before judging
any, the pipeline *screens* them: the mildest variant of each family (one conv in one mode, say) is
applied alone and its error measured quickly on the validation feeds (:meth:`Judge.error`: outputs --
logits where a Softmax ends the model -- relative to how much they vary); the family's other variants are
predicted by scaling that measurement with the pass's own estimates. Candidates are then tried in order of
MACs saved per predicted squared error, so cheap savings come first and the budget is not spent early on
aggressive rewrites of sensitive layers.
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
class Screening:
    """A lossy candidate's error predicted before judging: its family's mildest variant measured alone
    (``measured``, :meth:`Judge.error`) and this candidate's share of it (``predicted``)."""

    measured: float
    predicted: float
    screened: str  # description of the candidate that was measured

    def to_dict(self) -> dict[str, float | str]:
        return {"measured": self.measured, "predicted": self.predicted, "screened": self.screened}


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


#: Share of ``optimize``'s time budget that screening may use; families left unscreened are tried after the
#: screened ones, in the pass's own order.
SCREEN_SHARE = 0.5
#: Screening re-orders the families still to measure after every this many measurements.
RESCREEN_EVERY = 6
#: Predicted errors below this count as this much when ordering by MACs saved per squared error (a
#: rewrite measured as nearly free is not infinitely better than one measured as cheap).
ERROR_FLOOR = 1e-3
#: ... and so do those below this quantile of the errors the screening measured: below it measurements are
#: mostly noise, and between rewrites that are nearly free the larger saving should come first (on
#: open-nsfw's measured candidates this ordering reaches 1-2% more MACs saved within the same budget).
FLOOR_QUANTILE = 0.1


def _rank(candidates: list[Candidate], screened: Mapping[str, Screening] | None = None) -> list[Candidate]:
    """Trial order: the pass's priority when it gives one, else estimated MACs saved; ties by node names.

    Variants of one rewrite (a ``family``) are tried together, at the position of the family's best
    priority, the most aggressive first: the first one within budget is the one kept. Screened candidates
    (``screened``: by candidate key) come first, each on its own, by MACs saved per predicted squared
    error (errors floored at ``FLOOR_QUANTILE`` of those measured); those not screened follow in the
    order above.
    """
    screened = screened or {}
    measured = sorted({s.measured for s in screened.values()})
    floor = max(ERROR_FLOOR, measured[int(FLOOR_QUANTILE * (len(measured) - 1))] if measured else 0.0)
    first = sorted((c for c in candidates if c.key in screened),
                   key=lambda c: (-c.cost.macs_saved / max(screened[c.key].predicted, floor) ** 2, c.nodes, -c.level))
    rest = [c for c in candidates if c.key not in screened]
    return first + _rank_unscreened(rest)


def _rank_unscreened(candidates: list[Candidate]) -> list[Candidate]:
    def score(c: Candidate) -> float:
        return c.priority if c.priority is not None else float(c.cost.macs_saved)

    best: dict[str, float] = {}
    for c in candidates:
        if c.family is not None:
            best[c.family] = max(best.get(c.family, float("-inf")), score(c))

    def key(c: Candidate) -> tuple:
        if c.family is None:
            return (-score(c), "", 0.0, c.nodes)
        return (-best[c.family], c.family, -c.level, c.nodes)

    return sorted(candidates, key=key)


def _screen(
    p: Pass,
    model: Model,
    todo: list[Candidate],
    judge: Judge,
    families: dict[str, tuple[float, Candidate] | None],
    stop_at: float | None,
) -> dict[str, Screening]:
    """Measure the mildest variant of every family in ``todo`` not measured yet (alone, on ``model``; until
    ``stop_at``) into ``families``, and predict every screened family's candidates from it: the measured
    error times the candidate's own estimate over the measured variant's (the measurement itself where the
    pass gives no estimate).

    Families are measured in order of promise: at first the pass's own, then -- as measurements come in --
    by MACs saved per squared estimated error with each ``kind`` of estimate rescaled by what was measured
    for its kind so far (estimates of different kinds, e.g. modes of a factorization, are seldom on one
    scale). What a time limit leaves unmeasured is then what looks least promising.
    """
    variants: dict[str, list[Candidate]] = {}
    mildest: dict[str, Candidate] = {}
    for c in todo:
        if c.family is None or c.family in families:
            continue
        variants.setdefault(c.family, []).append(c)
        if c.family not in mildest or c.level < mildest[c.family].level:
            mildest[c.family] = c
    queue = _rank_unscreened(list(mildest.values()))
    if queue:
        try:
            p.prefetch(model, queue)
        except Exception as exc:  # a faulty pass must never end the run
            log.warning("%s.prefetch raised: %s", p.name, exc)
    ratios: dict[str, list[float]] = {}
    measured_count = 0
    while queue:
        if stop_at is not None and time.perf_counter() > stop_at:
            break
        rep = queue.pop(0)
        try:
            trial = model.fork()
            p.apply(trial, rep)
            error = judge.error(trial.commit())
            families[rep.family] = (error, rep)  # type: ignore[index]
            if rep.error:
                ratios.setdefault(rep.kind, []).append(error / rep.error)
        except Exception as exc:  # judged (and recorded) like any other when its turn comes
            log.info("%s: screening %s failed: %s", p.name, rep.description, exc)
            families[rep.family] = None  # type: ignore[index]
        measured_count += 1
        if ratios and measured_count % RESCREEN_EVERY == 0:
            queue = _by_calibrated_estimate(queue, variants, ratios)
    out: dict[str, Screening] = {}
    for c in todo:
        entry = families.get(c.family) if c.family is not None else None
        if entry is None:
            continue
        measured, rep = entry
        scale = c.error / rep.error if c.error is not None and rep.error else 1.0
        out[c.key] = Screening(measured, measured * scale, rep.description)
    return out


def _by_calibrated_estimate(queue: list[Candidate], variants: Mapping[str, list[Candidate]], ratios: Mapping[str, list[float]]) -> list[Candidate]:
    """``queue`` (families' mildest variants) reordered by the best MACs saved per squared estimated error of
    each family's variants, every estimate times the median measured/estimated ratio of its kind (of all
    kinds, for a kind not measured yet)."""
    everything = sorted(r for rs in ratios.values() for r in rs)
    overall = everything[len(everything) // 2]
    factor = {kind: sorted(rs)[len(rs) // 2] for kind, rs in ratios.items()}

    def promise(rep: Candidate) -> float:
        best = 0.0
        for v in variants.get(rep.family or "", [rep]):
            if v.error is None:
                continue
            predicted = max(v.error * factor.get(v.kind, overall), ERROR_FLOOR)
            best = max(best, v.cost.macs_saved / predicted ** 2)
        return best

    return sorted(queue, key=lambda c: (-promise(c), c.nodes))


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


def _settled(judge: Judge, base: Model, model: Model, threshold: float, exact: bool) -> LatencyComparison:
    """The whole-model comparison a pass is kept or undone on. Where the interval leaves the call open
    while the point estimate takes a side (a noisy machine), more pairs are measured and pooled, up to
    ``CONFIRMATIONS`` times: one unlucky measurement must not undo a whole search."""
    lat = judge.model_latency(base.proto, model.proto)
    for _ in range(CONFIRMATIONS):
        ci = lat.ci
        open_call = (not ci.slower(threshold) and ci.speedup < threshold) if exact else (not ci.faster(threshold) and ci.speedup > threshold)
        if not open_call:
            break
        log.info("whole-model speedup %s is not settled; measuring more pairs", ci)
        lat = pooled(lat, judge.model_latency(base.proto, model.proto), seed=judge.config.timing.seed)
    return lat


def _record_skips(run: PassRun, found: Sequence[Candidate | Skip]) -> None:
    seen = {(s.nodes, s.reason) for s in run.skips}
    for s in found:
        if isinstance(s, Skip) and (s.nodes, s.reason) not in seen:
            run.skips.append(s)
            seen.add((s.nodes, s.reason))


def _accuracy_failure(verdict: Verdict) -> bool:
    """Rejected for numerics or the task metric (not for latency)."""
    return not verdict.keep and verdict.latency is None


def _try(p: Pass, accepted: Model, candidate: Candidate, judge: Judge) -> tuple[Model | None, Decision]:
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
        verdict = judge.judge(accepted, committed, candidate, p.exact)
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
) -> OptimizeResult:
    """Run the guarded pipeline on a model path, proto or :class:`Model`; the source is never modified.

    ``passes``: names, instances, or ``None`` for the exact defaults. ``time_budget_s`` caps the whole
    call (search and closing end-to-end measurements, give or take one candidate); candidates left when
    it runs out are recorded as not tried. ``on_decision`` is called
    after each judged candidate with the decision and the model accepted after it (progress, sweeps).
    ``judge``: a ready :class:`Judge` of this very source model, whose reference outputs are then reused.
    ``screen``: measure lossy families before judging and order by predicted error (see the module
    docstring); with a ``time_budget_s``, screening stops at ``SCREEN_SHARE`` of it.
    """
    start = time.perf_counter()
    config = config or ValidationConfig()
    selected = resolve_passes(passes)
    original = _as_model(source, input_shapes, max_model_bytes)
    if judge is None:
        judge = Judge(original, feeds, config)
    elif judge.original is not original:
        raise ValueError("optimize: the judge was built for another model")
    if any(not p.exact for p in selected):
        if judge.feeds.synthetic or not judge.feeds.calibration:
            log.warning("lossy passes without calibration data fall back to weight-only fits; give --feeds or --images")
        else:
            original.calibration = Calibration(original, judge.feeds.calibration)
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
                screened = _screen(p, model, todo, judge, families, stop_at)
                log.info("%s: %d families screened; %d candidates with a predicted error", p.name, len(families), len(screened))
            todo = _rank(todo, screened)
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
                accepted, decision = _try(p, model, cand, judge)
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
            if not changed:
                break
        mine = decisions[first_decision:]
        if model is not before_pass and config.latency:
            threshold = config.exact_min_speedup if p.exact else config.lossy_min_speedup
            lat = _settled(judge, before_pass, model, threshold, p.exact)
            run.model_latency = lat
            if before_pass is original:
                measured = (model, lat)  # the same pair the final comparison would time
            undo = lat.ci.slower(config.exact_min_speedup) if p.exact else not lat.ci.faster(config.lossy_min_speedup)
            if undo:
                run.reverted = f"whole-model speedup {lat.ci} does not pay; pass undone"
                log.info("%s: %s", p.name, run.reverted)
                model = before_pass
                for i, d in enumerate(mine):
                    if d.kept:
                        decisions[first_decision + i] = replace(d, kept=False, reason=f"{d.reason}; {run.reverted}")
                mine = decisions[first_decision:]
        run.kept = sum(d.kept for d in mine)
        run.rolled_back = sum(not d.kept for d in mine)
    changed = model is not original
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
        for cand in _rank([c for c in found if isinstance(c, Candidate)]):
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
