"""What bound a search (:func:`rewriter.decision.summarize`): every candidate judged, the error budget spent, the
clock or the target -- from the decisions' outcomes, the budget spent and whether a round was left unstarted."""

from __future__ import annotations

import pytest

from rewriter.contract import Candidate, Cost
from rewriter.decision import Decision, summarize
from rewriter.outcome import Outcome


def _decisions(*outcomes: Outcome) -> list[Decision]:
    return [Decision(Candidate("p", (f"n{i}",), f"c{i}", Cost(10, 5, 1, 1)), False, o, o.value) for i, o in enumerate(outcomes)]


@pytest.mark.parametrize(("outcomes", "spent", "out_of_time", "bound"), [
    ((Outcome.KEPT, Outcome.NUMERICS, Outcome.NOT_TRIED_DOMINATED), 0.4, False, "complete"),
    ((Outcome.KEPT, Outcome.NOT_TRIED_TIME), 0.4, False, "time"),
    ((Outcome.KEPT, Outcome.NOT_TRIED_TIME), 0.95, False, "error_budget"),
    ((Outcome.KEPT, Outcome.LATENCY), 0.2, True, "time"),  # a round never started: candidates may be left
    ((Outcome.KEPT, Outcome.NOT_TRIED_TARGET, Outcome.NOT_TRIED_TIME), 0.99, False, "target"),
    ((Outcome.KEPT, Outcome.NOT_TRIED_TIME), None, False, "time"),  # exact runs have no error budget to spend
])
def test_the_bound_follows_the_outcomes_and_the_budget_spent(outcomes, spent, out_of_time, bound) -> None:  # type: ignore[no-untyped-def]
    summary = summarize(_decisions(*outcomes), spent, out_of_time, 120.0)
    assert summary.bound == bound
    assert summary.candidates == len(outcomes) and summary.judged == sum(o.tried for o in outcomes)


def test_counts_and_the_line_say_what_was_left_and_why() -> None:
    summary = summarize(_decisions(Outcome.KEPT, Outcome.METRIC, Outcome.NOT_TRIED_DOMINATED, Outcome.NOT_TRIED_TIME,
                                   Outcome.NOT_TRIED_TIME), 0.5, False, 60.0)
    assert (summary.judged, summary.dominated, summary.untried) == (2, 1, {"not_tried_time": 2})
    assert summary.to_dict() == {"bound": "time", "candidates": 5, "judged": 2, "dominated": 1, "untried": {"not_tried_time": 2},
                                 "budget_spent": 0.5, "time_budget_s": 60.0}
    assert summary.line() == "search: 2 of 5 candidates judged (2 time left); error budget 50% spent -- bound by the time budget"
