"""The records a search leaves: one :class:`Decision` per candidate, one :class:`PassRun` per pass."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from rewriter.contract import Candidate, Skip
from rewriter.outcome import Outcome
from rewriter.validation.judge import ProfileLatency, Verdict
from rewriter.validation.latency import LatencyComparison


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
    """What happened to one candidate: ``outcome`` is the value to read, ``reason`` the sentence for people."""

    candidate: Candidate
    exact: bool
    outcome: Outcome
    reason: str
    verdict: Verdict | None = None
    screening: Screening | None = None

    @property
    def kept(self) -> bool:
        """Kept (a plan replays it), including those later replaced (``superseded``)."""
        return self.outcome.kept

    @property
    def superseded(self) -> bool:
        """Kept, then replaced by a later kept rewrite of the nodes it made (not in the output model as such)."""
        return self.outcome is Outcome.SUPERSEDED

    @property
    def tried(self) -> bool:
        return self.outcome.tried

    def line(self) -> str:
        """One plain line for logs (``-v``, CI): pass, what and where, kept or rolled back with the outcome and
        why, and the speedup CI when latency was measured."""
        c, v = self.candidate, self.verdict
        what = "kept" if self.kept else "rolled back" if self.tried else "not tried"
        reason = self.reason.removeprefix(f"{self.outcome.value}: ")  # "numerics: numerics: ..." reads once
        why = "" if self.outcome is Outcome.KEPT else f": {reason}"
        speed = "not measured" if v is None or v.latency is None else f"{v.latency.ci} ({v.latency_scope})"
        text = f"{c.pass_name}: {what} {c.description} [nodes {', '.join(c.nodes)}] -- {self.outcome.value}{why}; speedup {speed}"
        return " ".join(text.split())

    def superseded_by(self, description: str) -> Decision:
        return replace(self, outcome=Outcome.SUPERSEDED, reason=f"{self.reason}; later replaced by: {description}")

    def undone(self, why: str) -> Decision:
        """This kept decision undone with its whole pass."""
        return replace(self, outcome=Outcome.PASS_UNDONE, reason=f"{self.reason}; {why}")

    def backed_off(self, why: str) -> Decision:
        """This kept decision undone after the search: the result broke the budget on the held-out test split."""
        return replace(self, outcome=Outcome.HOLDOUT, reason=f"{self.reason}; {why}")


def not_tried(candidate: Candidate, exact: bool, outcome: Outcome, why: str) -> Decision:
    """A candidate the search never judged, and why."""
    assert not outcome.tried, outcome
    return Decision(candidate, exact, outcome, f"not tried: {why}")


@dataclass
class PassRun:
    """One pass's part of the run."""

    name: str
    exact: bool
    kept: int = 0
    rolled_back: int = 0
    not_tried: int = 0
    skips: list[Skip] = field(default_factory=list)
    model_latency: LatencyComparison | None = None
    #: The whole-model check at each deployment profile, primary first (empty with a single profile).
    profile_latency: list[ProfileLatency] = field(default_factory=list)
    reverted: str | None = None
    #: onnxruntime runs the same graph after the pass as before it (an exact pass doing what its optimizer does
    #: anyway): latency unchanged by construction, not timed.
    same_deployed: bool = False

    def count(self, decisions: list[Decision]) -> None:
        """Set the counts from this pass's decisions."""
        self.kept = sum(d.kept for d in decisions)
        self.not_tried = sum(not d.tried for d in decisions)
        self.rolled_back = len(decisions) - self.kept - self.not_tried


#: A budget this much spent counts as spent: the candidates left would mostly fail it.
SPENT = 0.9


@dataclass(frozen=True)
class SearchSummary:
    """What bound a run's search: ``complete`` (every candidate found was judged, or refused because a milder
    variant of it had already failed the budget), ``error_budget`` (candidates were left, but the budget's worst
    term is at least :data:`SPENT` used), ``time`` (candidates were left for want of time, with budget to spare)
    or ``target`` (the target speedup was reached first)."""

    candidates: int
    judged: int
    #: Refused without a run of their own: a milder variant of the same rewrite had already failed the budget.
    dominated: int
    #: Candidates never judged, by outcome (``not_tried_time``, ``not_tried_target``, ...).
    untried: dict[str, int]
    #: Lossy runs: the worst budget term's fraction used by the result on the validation feeds (1: at the edge).
    budget_spent: float | None
    bound: str
    time_budget_s: float | None = None

    def to_dict(self) -> dict[str, object]:
        spent = None if self.budget_spent is None else round(min(self.budget_spent, 1e6), 4)
        return {"bound": self.bound, "candidates": self.candidates, "judged": self.judged, "dominated": self.dominated,
                "untried": dict(self.untried), "budget_spent": spent, "time_budget_s": self.time_budget_s}

    def line(self) -> str:
        """One sentence for people: what was judged, what was left and what bound the search."""
        left = sum(self.untried.values())
        spent = "" if self.budget_spent is None else f"; error budget {self.budget_spent:.0%} spent"
        why = {"complete": "every candidate judged", "error_budget": "bound by the error budget",
               "time": "bound by the time budget", "target": "the target speedup was reached"}[self.bound]
        untried = "" if not left else " (" + ", ".join(f"{n} {k.removeprefix('not_tried_')}" for k, n in self.untried.items()) + " left)"
        return f"search: {self.judged} of {self.candidates} candidates judged{untried}{spent} -- {why}"


def summarize(decisions: list[Decision], budget_spent: float | None, out_of_time: bool,
              time_budget_s: float | None = None) -> SearchSummary:
    """The :class:`SearchSummary` of a run's decisions. ``out_of_time``: the search stopped for want of time before
    it had listed every candidate (a round not started)."""
    dominated = sum(d.outcome is Outcome.NOT_TRIED_DOMINATED for d in decisions)
    untried: dict[str, int] = {}
    for d in decisions:
        if not d.tried and d.outcome is not Outcome.NOT_TRIED_DOMINATED:
            untried[d.outcome.value] = untried.get(d.outcome.value, 0) + 1
    if Outcome.NOT_TRIED_TARGET.value in untried:
        bound = "target"
    elif not untried and not out_of_time:
        bound = "complete"
    elif budget_spent is not None and budget_spent >= SPENT:
        bound = "error_budget"
    else:
        bound = "time"
    judged = sum(d.tried for d in decisions)
    return SearchSummary(len(decisions), judged, dominated, untried, budget_spent, bound, time_budget_s)
