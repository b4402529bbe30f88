"""Held-out confirmation: the search's result measured on data the search never saw, and backed off until it holds.

A search that judges on N validation feeds spends the error budget to the edge of those N. The user's data
is therefore split three ways (:func:`~rewriter.validation.feeds.split_holdout`): calibration, validation
and a *test* split that no part of the search runs -- not the judge, not calibration, not screening (the
pipeline hands the search :meth:`FeedSet.for_search <rewriter.validation.feeds.FeedSet.for_search>`). After
the search, :func:`confirm` measures the budget on the test split against the original model: the numerics
of every output (a second :class:`~rewriter.validation.judge.Judge`, on the test feeds) and, when the task
metric takes a ``split`` keyword, the metric on ``split="test"`` (:meth:`TaskMetric.score
<rewriter.validation.judge.TaskMetric.score>`; a metric without it is scored on the same data as in the search,
so it is not re-checked here and the report says so).

When the test split breaks the budget, the search backs off, one *unit* at a time, re-checking on the test
split after each, until it holds:

* A unit is a set of kept decisions that stand or fall together: a decision that rewrites nodes an earlier
  kept decision made (a stronger variant superseding a milder one, or any rewrite built on another's nodes)
  joins that decision's unit. Units are found by replaying the kept decisions in order from the original.
  Only units holding a lossy rewrite are backed off; exact rewrites are never backed off (they are exact),
  unless one built on a lossy rewrite's nodes and goes with it.
* Order (the back-off rule): the unit that spent the most budget per MAC saved goes first. A lossy
  decision's *spend* is the rise, at its verdict, of the budget's worst term -- the largest, over outputs
  and terms of ``--max-error`` (and the task metric's allowed drop), of the fraction of that term used:
  ``measured / bound`` for ``<=`` terms, ``(1 - measured) / (1 - bound)`` for cosine and top-k, ``bound /
  measured`` for SNR -- over the previous kept lossy decision's (0 for the first), never below 0. A unit's
  spend is its decisions' sum; its saving the MACs its decisions saved; its score ``spend / max(saving, 1)``
  (ties: the later unit first). All of it is measured on the validation feeds during the search, so the
  test split decides only *how far* the search backs off, never *which* rewrite goes: the numbers on it
  stay those of data that chose nothing but a stopping point.
* Each model without some units is rebuilt by replaying the remaining kept decisions in order from the
  original (:func:`~rewriter.trial.apply_candidate`), as a plan would. Undone decisions become
  :attr:`~rewriter.outcome.Outcome.HOLDOUT` and their passes' counts follow.

With ``fail`` (``--holdout-fail``) nothing is backed off: the result says the budget does not hold, and the
gate fails. The back-off is not bounded by the time budget: a written model must hold on the test split.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rewriter.contract import Pass
from rewriter.decision import Decision, PassRun
from rewriter.model import Model
from rewriter.search import SearchState
from rewriter.trial import apply_candidate
from rewriter.validation.feeds import FeedSet
from rewriter.validation.judge import Judge, TaskMetric
from rewriter.validation.numerics import Budget, OutputStats
from rewriter.validation.runtime import eval_session

log = logging.getLogger(__name__)

#: Metrics whose ideal value is 1 (a ``>=`` bound on them spends ``(1 - measured) / (1 - bound)``).
_UNIT_METRICS = ("cosine", "top1", "top5")


@dataclass(frozen=True)
class Check:
    """The budget measured once on the test split: numerics per output (empty without test feeds), the task
    metric on ``split="test"`` (``None`` when not scored) and what fails."""

    numerics: dict[str, OutputStats]
    metric: float | None
    failures: tuple[str, ...]

    @property
    def holds(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {"numerics": {k: v.to_dict() for k, v in self.numerics.items()}, "metric": self.metric,
                "holds": self.holds, "failures": list(self.failures)}


@dataclass(frozen=True)
class BackOff:
    """One unit undone: its decisions (indices into the run's decision list), its spend and saving on the
    validation feeds, and the test split's check of the model without it (and the units before it)."""

    decisions: tuple[int, ...]
    descriptions: tuple[str, ...]
    spend: float
    macs_saved: int
    after: Check

    @property
    def score(self) -> float:
        return self.spend / max(self.macs_saved, 1)

    def to_dict(self) -> dict[str, Any]:
        return {"decisions": list(self.decisions), "descriptions": list(self.descriptions), "spend": _finite(self.spend),
                "macs_saved": self.macs_saved, "score": _finite(self.score), "holds_after": self.after.holds,
                "failures_after": list(self.after.failures)}


@dataclass
class Holdout:
    """What the held-out confirmation found and did (the report's ``holdout`` section).

    ``status``: ``off`` (no test split and no metric split: nothing to confirm on), ``held`` (the search's
    result holds on the test split), ``backed_off`` (it did not; lossy rewrites were undone until it did) or
    ``broken`` (it does not hold: ``--holdout-fail`` asked not to back off, or nothing was left to undo).
    """

    status: str
    reason: str
    sizes: dict[str, int]
    #: Whether the task metric was scored on ``split="test"`` (``None``: no task metric).
    metric_split: bool | None = None
    metric_baseline: float | None = None
    #: The search's result on the test split, and the written model's (the same check when nothing was undone).
    searched: Check | None = None
    final: Check | None = None
    backed_off: list[BackOff] = field(default_factory=list)

    @property
    def holds(self) -> bool | None:
        """Whether the output model holds the budget on the test split (``None``: not confirmed)."""
        if self.status == "off":
            return None
        return self.final is None or self.final.holds

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "reason": self.reason,
            "sizes": dict(self.sizes),
            "holds": self.holds,
            "metric_split": self.metric_split,
            "metric_baseline": self.metric_baseline,
            "searched": None if self.searched is None else self.searched.to_dict(),
            "final": None if self.final is None else self.final.to_dict(),
            "backed_off": [b.to_dict() for b in self.backed_off],
        }


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


# -- the test split --------------------------------------------------------------------------------------
class HeldOutSplit:
    """Measures a model's budget on the test split against the original: numerics on the test feeds (a
    :class:`Judge` of its own, so the search's judge never holds them) and the metric on ``split="test"``."""

    def __init__(self, state: SearchState, feeds: FeedSet) -> None:
        self.original = state.original
        self.config = state.judge.config
        self.judge = None
        if feeds.test:
            self.judge = Judge(state.original, FeedSet(list(feeds.test), [], f"test split of {feeds.source}"), self.config, state.deadline)
        metric = self.config.metric
        self.metric = metric if metric is not None and metric.takes_split else None
        self._baseline: float | None = None

    @property
    def active(self) -> bool:
        return self.judge is not None or self.metric is not None

    def baseline(self) -> float | None:
        if self.metric is None:
            return None
        if self._baseline is None:
            self._baseline = self._score(self.original)
        return self._baseline

    def _score(self, model: Model) -> float:
        assert self.metric is not None
        return self.metric.score(eval_session(model.proto, self.config.runtime), "test")

    def check(self, model: Model, exact: bool) -> Check:
        numerics = self.judge.numerics(model.proto) if self.judge is not None else {}
        failures = list(self.config.budget.failures(numerics, exact)) if numerics else []
        metric = None
        if self.metric is not None:
            metric = self._score(model)
            why = self.metric.failure(self.baseline() or 0.0, metric)
            if why is not None:
                failures.append(why)
        return Check(numerics, metric, tuple(f"test split: {f}" for f in failures))


# -- the back-off rule -----------------------------------------------------------------------------------
def budget_spend(numerics: Mapping[str, OutputStats], budget: Budget, metric: tuple[float, float, TaskMetric] | None = None) -> float:
    """The budget's worst term as a fraction used (1: at the edge; see the module docstring). ``metric``:
    ``(baseline, value, task metric)`` when it was measured: its allowed drop and its floor are terms too
    (:meth:`TaskMetric.spend <rewriter.validation.judge.TaskMetric.spend>`)."""
    worst = 0.0
    for name, s in numerics.items():
        for b in budget.bounds:
            if b.output not in (None, name):
                continue
            m = s.value(b.metric)
            if m is None or not math.isfinite(m):
                continue
            if b.op == "<=":
                used = m / b.value if b.value > 0 else (0.0 if m <= 0 else math.inf)
            elif b.metric in _UNIT_METRICS:
                used = (1.0 - m) / (1.0 - b.value) if b.value < 1 else (0.0 if m >= 1 else math.inf)
            else:
                used = b.value / m if m > 0 else math.inf
            worst = max(worst, used)
    if metric is not None:
        baseline, value, task = metric
        worst = max(worst, task.spend(baseline, value))
    return worst


def spends(decisions: Sequence[Decision], budget: Budget, metric_baseline: float | None = None, task: TaskMetric | None = None) -> dict[int, float]:
    """Each kept lossy decision's spend: the rise of :func:`budget_spend` at its verdict over the previous
    kept lossy decision's, never below 0."""
    out: dict[int, float] = {}
    previous = 0.0
    for i, d in enumerate(decisions):
        if not d.kept or d.exact or d.verdict is None:
            continue
        v = d.verdict
        metric = (metric_baseline, v.metric, task) if metric_baseline is not None and v.metric is not None and task is not None else None
        now = budget_spend(v.numerics, budget, metric)
        out[i] = max(0.0, now - previous)
        previous = now
    return out


@dataclass(frozen=True)
class Unit:
    """Kept decisions that stand or fall together (see the module docstring)."""

    members: tuple[int, ...]
    lossy: bool
    spend: float
    macs_saved: int

    @property
    def score(self) -> float:
        return self.spend / max(self.macs_saved, 1)


def _created(p: Pass, model: Model, decision: Decision) -> tuple[Model, set[str]]:
    after = apply_candidate(p, model, decision.candidate)
    old = {n.name for n in model.proto.graph.node}
    return after, {n.name for n in after.proto.graph.node if n.name not in old}


def units(original: Model, decisions: Sequence[Decision], passes: Mapping[str, Pass], spent: Mapping[int, float]) -> list[Unit]:
    """The kept decisions grouped into units, by replaying them in order from ``original``: a decision whose
    candidate names a node an earlier decision made joins that decision's unit."""
    parent: dict[int, int] = {}

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    made_by: dict[str, int] = {}
    model = original
    for i, d in enumerate(decisions):
        if not d.kept:
            continue
        parent[i] = i
        for n in d.candidate.nodes:
            if n in made_by:
                parent[root(i)] = root(made_by[n])
        model, created = _created(passes[d.candidate.pass_name], model, d)
        for n in created:
            made_by[n] = i
    groups: dict[int, list[int]] = {}
    for i in parent:
        groups.setdefault(root(i), []).append(i)
    out = []
    for members in groups.values():
        ds = [decisions[i] for i in members]
        saved = sum(d.candidate.cost.macs_before - d.candidate.cost.macs_after for d in ds)
        out.append(Unit(tuple(sorted(members)), any(not d.exact for d in ds), sum(spent.get(i, 0.0) for i in members), saved))
    return out


def back_off_order(found: Sequence[Unit]) -> list[Unit]:
    """The lossy units, most budget spent per MAC saved first (ties: the later unit first)."""
    lossy = [u for u in found if u.lossy]
    return sorted(lossy, key=lambda u: (u.score, max(u.members)), reverse=True)


def rebuild(original: Model, decisions: Sequence[Decision], passes: Mapping[str, Pass], undone: set[int]) -> Model:
    """``original`` with every kept decision not in ``undone`` replayed in order."""
    model = original
    for i, d in enumerate(decisions):
        if d.kept and i not in undone:
            model = apply_candidate(passes[d.candidate.pass_name], model, d.candidate)
    return model


def _in_model_exact(decisions: Sequence[Decision], undone: set[int] | None = None) -> bool:
    """Whether every rewrite left in the model is exact (the exact budget applies then)."""
    return all(d.exact for i, d in enumerate(decisions) if d.kept and i not in (undone or ()))


def recount(runs: Sequence[PassRun], decisions: Sequence[Decision]) -> None:
    """Set each pass run's counts again (decisions are recorded pass by pass, in order)."""
    start = 0
    for run in runs:
        n = run.kept + run.rolled_back + run.not_tried
        run.count(list(decisions[start:start + n]))
        start += n


def _back_off(state: SearchState, split: HeldOutSplit, passes: Sequence[Pass], result: Holdout, searched: Model) -> tuple[Model, Check, set[int]]:
    """Undo units of ``searched`` in :func:`back_off_order` until the test split holds (or none is left): the
    model, its check and the decisions undone. Each step is recorded in ``result.backed_off``."""
    decisions, budget, metric = state.decisions, state.judge.config.budget, state.judge.config.metric
    by_name = {p.name: p for p in reversed(passes)}  # the first instance of a name, as the search ran it
    spent = spends(decisions, budget, state.judge.metric_baseline if metric is not None else None, metric)
    undone: set[int] = set()
    model, check = searched, result.searched
    assert check is not None
    for unit in back_off_order(units(state.original, decisions, by_name, spent)):
        undone |= set(unit.members)
        model = rebuild(state.original, decisions, by_name, undone)
        check = split.check(model, _in_model_exact(decisions, undone))
        names = tuple(decisions[i].candidate.description for i in unit.members)
        result.backed_off.append(BackOff(unit.members, names, unit.spend, unit.macs_saved, check))
        log.info("backed off %s: test split %s", ", ".join(names), "holds" if check.holds else "; ".join(check.failures))
        if check.holds:
            break
    return model, check, undone


# -- the confirmation ------------------------------------------------------------------------------------
def confirm(state: SearchState, model: Model, runs: Sequence[PassRun], passes: Sequence[Pass], feeds: FeedSet, *,
            fail: bool = False) -> tuple[Model, Holdout]:
    """Confirm the search's result ``model`` on the held-out test split of ``feeds`` and back off until it
    holds (see the module docstring); the model to write and what was found. Marks undone decisions in
    ``state.decisions`` and recounts ``runs``."""
    sizes = feeds.sizes()
    metric = state.judge.config.metric
    split = HeldOutSplit(state, feeds)
    metric_split = None if metric is None else split.metric is not None
    if not split.active:
        why = ("random feeds: nothing to hold out (they are not data); give --feeds, --images or --data-loader-script"
               if feeds.synthetic else "no test split (--holdout-fraction 0)")
        return model, Holdout("off", why, sizes, metric_split)
    if model is state.original:
        return model, Holdout("held", "no rewrite kept: the output is the input", sizes, metric_split, split.baseline())
    decisions = state.decisions
    searched = split.check(model, _in_model_exact(decisions))
    result = Holdout("held", "the search's result holds the budget on the test split", sizes, metric_split, split.baseline(), searched, searched)
    if searched.holds:
        return model, result
    if fail:  # the gate says why
        result.status, result.reason = "broken", "breaks the budget on the test split; not backed off (--holdout-fail)"
        return model, result
    log.warning("the search's result breaks the budget on the held-out test split (%s); backing off", "; ".join(searched.failures))
    try:
        model, check, undone = _back_off(state, split, passes, result, model)
    except Exception as exc:  # a replay that fails leaves the search's result, which the gate then refuses
        log.warning("backing off failed: %s: %s", type(exc).__name__, exc)
        result.status, result.reason = "broken", f"breaks the budget on the test split; backing off failed ({type(exc).__name__}: {exc})"
        result.backed_off.clear()
        return model, result
    decisions = state.decisions
    why = f"undone: broke the budget on the held-out test split ({'; '.join(searched.failures)})"
    for i in sorted(undone):
        decisions[i] = decisions[i].backed_off(why)
    recount(runs, decisions)
    result.final = check
    if check.holds:
        result.status, result.reason = "backed_off", f"broke the budget on the test split; {len(undone)} rewrite(s) undone until it held"
    else:
        result.status, result.reason = "broken", "breaks the budget on the test split with every lossy rewrite undone"
    return model, result
