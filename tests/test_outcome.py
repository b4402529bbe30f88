"""Outcomes are values: what is kept, what was tried, and how decisions change."""

from __future__ import annotations

import pytest

from rewriter.contract import Candidate, Cost
from rewriter.decision import Decision, PassRun, not_tried
from rewriter.outcome import Outcome

KINDS = {
    Outcome.KEPT: "kept", Outcome.SUPERSEDED: "kept",
    Outcome.NUMERICS: "rolled_back", Outcome.METRIC: "rolled_back", Outcome.LATENCY: "rolled_back",
    Outcome.PASS_UNDONE: "rolled_back", Outcome.HOLDOUT: "rolled_back", Outcome.STALE: "rolled_back", Outcome.RAISED: "rolled_back",
    Outcome.VALIDATION_FAILED: "rolled_back",
    Outcome.NOT_TRIED_TIME: "not_tried", Outcome.NOT_TRIED_TARGET: "not_tried",
    Outcome.NOT_TRIED_DOMINATED: "not_tried", Outcome.NOT_TRIED_UNVALIDATED: "not_tried",
}
CAND = Candidate("p", ("a",), "fuse a", Cost(10, 5, 1, 1))


def test_every_outcome_has_a_kind() -> None:
    assert set(KINDS) == set(Outcome)
    for outcome, kind in KINDS.items():
        assert outcome.kind == kind
        assert outcome.kept == (kind == "kept") and outcome.tried == (kind != "not_tried")
    assert {o for o in Outcome if o.accuracy} == {Outcome.NUMERICS, Outcome.METRIC}
    assert Outcome("not_tried_time") is Outcome.NOT_TRIED_TIME  # JSON values read back


def test_a_kept_decision_superseded_stays_kept_and_undone_does_not() -> None:
    kept = Decision(CAND, True, Outcome.KEPT, "exact")
    replaced = kept.superseded_by("fuse a harder")
    assert replaced.kept and replaced.superseded and replaced.outcome is Outcome.SUPERSEDED
    assert replaced.reason == "exact; later replaced by: fuse a harder"
    undone = kept.undone("pass undone")
    assert not undone.kept and undone.tried and undone.outcome is Outcome.PASS_UNDONE and undone.reason == "exact; pass undone"
    backed = kept.backed_off("undone: broke the budget on the held-out test split")
    assert not backed.kept and backed.tried and backed.outcome is Outcome.HOLDOUT and backed.outcome.kind == "rolled_back"
    assert backed.reason == "exact; undone: broke the budget on the held-out test split"


def test_not_tried_needs_a_not_tried_outcome() -> None:
    d = not_tried(CAND, False, Outcome.NOT_TRIED_TIME, "validation time budget exhausted")
    assert not d.tried and not d.kept and d.reason == "not tried: validation time budget exhausted"
    with pytest.raises(AssertionError):
        not_tried(CAND, False, Outcome.NUMERICS, "no")


def test_a_pass_run_counts_each_kind() -> None:
    run = PassRun("p", True)
    outcomes = [Outcome.KEPT, Outcome.SUPERSEDED, Outcome.NUMERICS, Outcome.PASS_UNDONE, Outcome.NOT_TRIED_TIME]
    run.count([Decision(CAND, True, o, "") for o in outcomes])
    assert (run.kept, run.rolled_back, run.not_tried) == (2, 2, 1)
