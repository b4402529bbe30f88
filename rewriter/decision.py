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
