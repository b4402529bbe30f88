"""What became of one candidate, as a value: the report, plans, fleet summaries and benchmarks read it;
the decision's ``reason`` sentence is for people."""

from __future__ import annotations

from enum import Enum


class Outcome(str, Enum):
    """One candidate's outcome. ``kind`` groups them: ``kept``, ``rolled_back`` (tried and refused, or kept
    and undone with its pass) and ``not_tried`` (never judged)."""

    #: Judged and kept; the rewrite is in the output model.
    KEPT = "kept"
    #: Kept, then replaced by a later kept rewrite of the nodes it made (a plan replays both).
    SUPERSEDED = "superseded"
    #: Outputs left the numerics budget.
    NUMERICS = "numerics"
    #: The user's task metric dropped more than allowed.
    METRIC = "metric"
    #: Not shown fast enough (slower, or no speedup shown where one is needed).
    LATENCY = "latency"
    #: Kept alone, then undone with its whole pass: the pass did not pay end to end.
    PASS_UNDONE = "pass_undone"
    #: Kept by the search, then undone: the result broke the budget on the held-out test split.
    HOLDOUT = "holdout"
    #: The graph changed since the candidate was found; it no longer applies.
    STALE = "stale"
    #: The pass raised while applying it.
    RAISED = "raised"
    #: Validation itself failed (onnxruntime could not run the rewritten model).
    VALIDATION_FAILED = "validation_failed"
    #: Not tried: the time budget ran out first.
    NOT_TRIED_TIME = "not_tried_time"
    #: Not tried: the target speedup was reached first.
    NOT_TRIED_TARGET = "not_tried_target"
    #: Not tried: a milder variant of the same rewrite already failed the numerics budget.
    NOT_TRIED_DOMINATED = "not_tried_dominated"
    #: Not tried: the original model cannot be run for reference outputs.
    NOT_TRIED_UNVALIDATED = "not_tried_unvalidated"

    @property
    def kept(self) -> bool:
        """Kept (a plan replays it), whether or not a later rewrite replaced it."""
        return self in (Outcome.KEPT, Outcome.SUPERSEDED)

    @property
    def tried(self) -> bool:
        """Applied and judged (or raised trying)."""
        return not self.value.startswith("not_tried")

    @property
    def kind(self) -> str:
        """``kept``, ``rolled_back`` or ``not_tried``."""
        if self.kept:
            return "kept"
        return "rolled_back" if self.tried else "not_tried"

    @property
    def accuracy(self) -> bool:
        """Refused for accuracy (numerics or the task metric), not for speed."""
        return self in (Outcome.NUMERICS, Outcome.METRIC)
