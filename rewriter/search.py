"""The search: one pass's rounds of find -> order -> try -> decide over the accepted model.

A :class:`PassSearch` owns one pass's state across its rounds: the candidates it tried, the variant levels
that failed numerics per family, the screened families, which decision made which node (to mark a milder
variant superseded by a stronger one), and the pass's :class:`~rewriter.decision.PassRun`. What the passes
of one run share -- the original model, the judge, the :class:`~rewriter.deadline.Deadline`, the speedup
:class:`Target`, the decision list -- is a :class:`SearchState`. Every candidate goes through
:func:`~rewriter.trial.try_candidate`; a candidate the search does not try is recorded with a not-tried
:class:`~rewriter.outcome.Outcome` saying why.

Lossy passes are screened before judging and tried by MACs saved per predicted squared error (see
:mod:`rewriter.screening`). A candidate whose nodes the same pass already replaced -- a stronger variant of
a conv factorized mildly before -- is re-expressed by the pass (:meth:`Pass.refresh`) and judged in its turn
as a replacement; the earlier decision is then marked superseded.

Exact passes prove a round's candidates together (:func:`prove_round`): all of them are applied in turn and
the result's numerics checked once; within the exact budget, each candidate is then judged on latency alone.
Where the round fails, each candidate is proven alone, as lossy ones are.

In a run of exact passes only (:attr:`Judge.deferred <rewriter.validation.judge.Judge.deferred>`), a round is
kept on neither numerics nor a timing of its own -- the pipeline proves the whole result once -- except rewrites
that lower neither MACs nor nodes: a round of those is timed as one group (:func:`~rewriter.rounds.settle_speculative`).

After its rounds, a pass that changed the model is checked end to end (:meth:`PassSearch.close`): where the
whole model is not shown to pay, the pass is undone and its kept decisions say so.

Before any data is made, :func:`nothing_to_rewrite` tells whether any pass has a candidate at all.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from rewriter.contract import Candidate, Pass, Skip
from rewriter.deadline import Deadline
from rewriter.decision import Decision, PassRun, not_tried
from rewriter.model import Model
from rewriter.outcome import Outcome
from rewriter.screening import Screening, rank, screen_candidates
from rewriter.rounds import SettledRound, new_nodes, prove_round, round_decision, settle_round, settle_speculative, settled
from rewriter.trial import try_candidate
from rewriter.validation.deployment import DeploymentProfile
from rewriter.validation.judge import Judge, ProfileLatency, Verdict
from rewriter.validation.latency import LatencyComparison
from rewriter.validation.numerics import OutputStats

log = logging.getLogger(__name__)

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

    def reset(self) -> None:
        """Forget the measurements (the model they were taken on was undone)."""
        self.last, self.model, self.saved_s, self.reached = None, None, 0.0, False


def nothing_to_rewrite(passes: Sequence[Pass], model: Model) -> list[PassRun] | None:
    """The passes' runs, with their skips, when none of them has a candidate on ``model``; ``None`` as soon as
    one has. Needs no data: data-aware passes look without calibration (they are handed theirs before
    the search), after the others, so that a cheap find usually answers first. A find that raises counts
    as finding nothing (recorded as a skip, as the search records it)."""
    runs = {}
    for p in sorted(passes, key=lambda p: p.data_aware):
        run = runs[id(p)] = PassRun(p.name, p.exact)
        if p.data_aware:
            p.use_calibration(None)
        seen: set[tuple[tuple[str, ...], str]] = set()
        try:
            for found in p.find(model):
                if isinstance(found, Candidate):
                    return None
                if (found.nodes, found.reason) not in seen:
                    run.skips.append(found)
                    seen.add((found.nodes, found.reason))
        except Exception as exc:
            log.warning("%s.find raised: %s", p.name, exc)
            run.skips.append(Skip(p.name, (), f"find raised {type(exc).__name__}: {exc}"))
    return [runs[id(p)] for p in passes]


@dataclass
class SearchState:
    """What the passes of one run share."""

    original: Model
    judge: Judge
    deadline: Deadline
    target: Target | None = None
    screen: bool = True
    #: Called after each judged candidate with its decision and the model accepted after it.
    on_decision: Callable[[Decision, Model], None] | None = None
    #: Called when a round starts with the pass's name and the number of candidates it will go through.
    on_round: Callable[[str, int], None] | None = None
    decisions: list[Decision] = field(default_factory=list)
    #: A pass stopped for want of time before it had listed every candidate (a round not started).
    out_of_time: bool = False


class PassSearch:
    """One pass's search over rounds (see the module docstring)."""

    def __init__(self, p: Pass, state: SearchState) -> None:
        self.p = p
        self.state = state
        self.run = PassRun(p.name, p.exact)
        self.first = len(state.decisions)  # this pass's decisions are state.decisions[first:]
        self.tried: set[str] = set()
        self.failed_levels: dict[str, float] = {}  # family -> lowest level that failed for accuracy
        self.families: dict[str, tuple[float, Candidate] | None] = {}  # screened family -> (error, measured variant)
        self.created: dict[str, int] = {}  # node name -> index of the decision whose rewrite made it
        self.screened: dict[str, Screening] = {}
        #: A whole-model timing already taken: (base, model, comparison per profile) of a round judged as a group.
        self.whole: tuple[Model, Model, tuple[ProfileLatency, ...]] | None = None
        self.find_seconds = 0.0

    @property
    def decisions(self) -> list[Decision]:
        return self.state.decisions[self.first:]

    def _target_reached(self) -> bool:
        target = self.state.target
        return target is not None and target.reached and not self.p.exact

    # -- rounds ----------------------------------------------------------------------------------------
    def search(self, model: Model, max_rounds: int) -> Model:
        """Run up to ``max_rounds`` rounds from ``model``; the model accepted at the end."""
        for round_index in range(max_rounds):
            if self._target_reached():
                if round_index == 0:
                    self.run.skips.append(Skip(self.p.name, (), f"not run: target speedup {self.state.target.speedup:g}x already reached"))  # type: ignore[union-attr]
                break
            if self.decisions and not self.state.deadline.fits(self.find_seconds):
                self.state.out_of_time = True
                break  # no time for another find and one candidate: a new round could only list them as not tried
            log.debug("%s: round %d at %.1f s", self.p.name, round_index + 1, self.state.deadline.elapsed())
            todo = self._find(model)
            if not todo:
                break
            model, changed = self._round(model, todo)
            if not changed:
                break
        return model

    def _find(self, model: Model) -> list[Candidate]:
        """The pass's candidates not tried yet (its skips recorded); none when ``find`` raises."""
        began = time.perf_counter()
        try:
            found = list(self.p.find(model))
        except Exception as exc:
            log.warning("%s.find raised: %s", self.p.name, exc)
            self.run.skips.append(Skip(self.p.name, (), f"find raised {type(exc).__name__}: {exc}"))
            return []
        self.find_seconds = time.perf_counter() - began
        seen = {(s.nodes, s.reason) for s in self.run.skips}
        for s in found:
            if isinstance(s, Skip) and (s.nodes, s.reason) not in seen:
                self.run.skips.append(s)
                seen.add((s.nodes, s.reason))
        return [c for c in found if isinstance(c, Candidate) and c.key not in self.tried]

    def _order(self, model: Model, todo: list[Candidate]) -> list[Candidate]:
        """The round's trial order: screened (lossy passes, when on), then ranked."""
        judge = self.state.judge
        if self.state.screen and not self.p.exact and judge.reference_error() is None:
            self.screened = screen_candidates(self.p, model, todo, judge, self.families, self.state.deadline.screen_end)
            log.info("%s: %d families screened; %d candidates with a predicted error", self.p.name, len(self.families), len(self.screened))
        return rank(todo, self.screened)

    def _round(self, model: Model, todo: list[Candidate]) -> tuple[Model, bool]:
        """Try every candidate of one round in order; the accepted model and whether it changed."""
        todo = self._order(model, todo)
        if self.state.on_round is not None:
            self.state.on_round(self.p.name, len(todo))
        proof = prove_round(self.p, model, todo, self.state.judge, self.state.deadline)
        together = None if proof is None else settle_round(self.p, model, proof, self.state.judge, self.state.deadline)
        if together is None and proof is None:
            together = settle_speculative(self.p, model, todo, self.state.judge, self.state.deadline)
        if together is not None:
            return self._record_round(model, together), True
        round_kept: list[str] = []
        changed = False
        for cand in todo:
            current = self._current(model, cand)
            if current is None:
                continue
            self.tried.add(current.key)
            skipped = self._not_tried(current)
            if skipped is not None:
                self.state.decisions.append(skipped)
                continue
            # The round's proof holds while this path builds the same models (after a rollback or a
            # refreshed candidate the rest are proven alone).
            proven = proof.numerics if proof is not None and proof.covers(round_kept, current.key) else None
            accepted = self._try(model, current, proven)
            if accepted is not None:
                model, changed = accepted, True
                round_kept.append(current.key)
        return model, changed

    def _record_round(self, model: Model, settled_round: SettledRound) -> Model:
        """Record the decisions of a round judged as a group (:func:`~rewriter.rounds.settle_round`); the model it left."""
        state, n = self.state, sum(len(g.candidates) for g in settled_round.groups)
        first = settled_round.groups[0]
        if len(settled_round.groups) == 1 and first.slower_at is None and not first.speculative:  # one timing of this very pair
            self.whole = (model, settled_round.model, settled_round.groups[0].profiles)
        for group in settled_round.groups:
            for cand in group.candidates:
                self.tried.add(cand.key)
                decision = round_decision(cand, group, settled_round, n)
                state.deadline.record(decision.verdict.seconds if decision.verdict else 0.0)
                state.decisions.append(decision)
                if decision.kept:
                    self._note_made(cand, len(state.decisions) - 1, settled_round.made.get(cand.key, frozenset()))
                if state.on_decision is not None:
                    state.on_decision(decision, settled_round.model)
                log.info("%s", decision.line())
        return settled_round.model

    def _current(self, model: Model, cand: Candidate) -> Candidate | None:
        """``cand`` as it applies to ``model`` now: itself, or -- when an earlier rewrite of this round
        consumed its nodes -- the pass's re-expression of it (a stronger variant replacing a milder one
        kept), else ``None`` (it is found afresh next round)."""
        if all(model.node(n) is not None for n in cand.nodes):
            return cand
        fresh = self.p.refresh(model, cand)
        if fresh is None or fresh.key in self.tried or any(model.node(n) is None for n in fresh.nodes):
            return None
        self.tried.add(cand.key)
        return fresh

    def _not_tried(self, cand: Candidate) -> Decision | None:
        """The decision for a candidate the search will not try now, or ``None`` to try it."""
        target, exact = self.state.target, self.p.exact
        if target is not None and target.reached and not exact:
            last = target.last.ci if target.last else ""
            return not_tried(cand, exact, Outcome.NOT_TRIED_TARGET, f"target speedup {target.speedup:g}x reached ({last})")
        if not self.state.deadline.fits():
            return not_tried(cand, exact, Outcome.NOT_TRIED_TIME, "validation time budget exhausted")
        unusable = self.state.judge.reference_error()
        if unusable is not None:
            return not_tried(cand, exact, Outcome.NOT_TRIED_UNVALIDATED, f"no rewrite can be validated ({unusable})")
        if cand.family is not None and cand.level >= self.failed_levels.get(cand.family, float("inf")):
            return not_tried(cand, exact, Outcome.NOT_TRIED_DOMINATED, "a milder variant already failed the numerics budget")
        return None

    def _try(self, model: Model, cand: Candidate, proven: dict[str, OutputStats] | None) -> Model | None:
        """Try one candidate on ``model`` and record the decision; the new accepted model when kept."""
        state = self.state
        trial = try_candidate(self.p, model, cand, state.judge, proven)
        decision = trial.decision
        prediction = self.screened.get(cand.key)
        if prediction is not None:
            decision = replace(decision, screening=prediction)
        state.deadline.record(trial.seconds)
        state.decisions.append(decision)
        if state.on_decision is not None:
            state.on_decision(decision, trial.model if trial.model is not None else model)
        if cand.family is not None and decision.outcome.accuracy:
            self.failed_levels[cand.family] = min(cand.level, self.failed_levels.get(cand.family, float("inf")))
        log.info("%s", decision.line())
        if trial.model is None:
            return None
        self._note_made(cand, len(state.decisions) - 1, new_nodes(model, trial.model))
        if state.target is not None and not self.p.exact:
            state.target.after_kept(decision.verdict, state.judge, state.original, trial.model)
        return trial.model

    def _note_made(self, cand: Candidate, index: int, made: frozenset[str]) -> None:
        """Record which nodes the kept decision ``index`` made; where it replaced only nodes that earlier kept
        decisions made (a stronger variant in place of a milder one), mark those superseded (they stay kept:
        a plan replays them in order, and the later one rewrites their nodes)."""
        decisions, created = self.state.decisions, self.created
        earlier = {created[n] for n in cand.nodes if n in created}
        if earlier and all(n in created for n in cand.nodes):
            for j in sorted(earlier):
                decisions[j] = decisions[j].superseded_by(cand.description)
        for name in made:
            created[name] = index

    # -- the pass's end ----------------------------------------------------------------------------------
    def close(self, before_pass: Model, model: Model) -> Model:
        """Check the pass end to end (``model`` against ``before_pass``, at every deployment profile) when it
        changed the model and latency is measured (an exact pass whose latency is deferred to the whole result,
        :attr:`Judge.deferred`, is not checked here); undo it when the whole model does not pay on one of them.
        Sets the run's counts; the model kept."""
        state, config = self.state, self.state.judge.config
        if model is not before_pass and config.latency and not (self.p.exact and state.judge.deferred):
            failed = self._settle(before_pass, model)
            if failed is not None:
                self.run.reverted = f"whole-model speedup {failed} does not pay; pass undone"
                log.info("%s: %s", self.p.name, self.run.reverted)
                model = before_pass
                if state.target is not None and not self.p.exact:
                    state.target.reset()
                for i in range(self.first, len(state.decisions)):
                    if state.decisions[i].kept:
                        state.decisions[i] = state.decisions[i].undone(self.run.reverted)
        self.run.count(self.decisions)
        return model

    def _settle(self, before_pass: Model, model: Model) -> str | None:
        """Measure the pass end to end at each profile, primary first (the run records them); the first
        profile it does not pay on, as ``CI[ at PROFILE]``, or ``None``."""
        state, config = self.state, self.state.judge.config
        exact, target = self.p.exact, state.target
        threshold = config.exact_min_speedup if exact else config.lossy_min_speedup
        first = target.last if target is not None and target.model is model and before_pass is state.original else None
        if exact and state.judge.same_deployed(before_pass.proto, model.proto):  # cached when a round already asked
            self.run.same_deployed = True  # onnxruntime runs the same graph: unchanged by construction, nothing to time
            return None
        profiles = config.deployments
        known = {}
        if self.whole is not None and self.whole[0] is before_pass and self.whole[1] is model:
            known = {p.profile: p.latency for p in self.whole[2]}  # the pass was one round, timed as a group
        for i, profile in enumerate(profiles):
            lat = settled(state.judge, before_pass, model, threshold, exact, known.get(profile) or (first if i == 0 else None), profile)
            if i == 0:
                self.run.model_latency = lat
            if len(profiles) > 1:
                self.run.profile_latency.append(ProfileLatency(profile, lat, "model"))
            undo = lat.ci.slower(config.exact_min_speedup) if exact else not lat.ci.faster(config.lossy_min_speedup)
            if undo:
                return f"{lat.ci}" + (f" at {profile.label}" if len(profiles) > 1 else "")
        return None
