"""The terminal progress display (rewriter.progress): driven by decisions, shown only when enabled."""

from __future__ import annotations

import io

from rich.console import Console

from rewriter.contract import Candidate, Cost
from rewriter.decision import Decision
from rewriter.outcome import Outcome
from rewriter.progress import DecisionProgress
from rewriter.validation.judge import Verdict
from rewriter.validation.latency import LatencyComparison
from rewriter.validation.stats import RatioCI


def decision(node: str, outcome: Outcome, speedup: float | None) -> Decision:
    cand = Candidate("bottleneck", (node,), f"input-side bottleneck of {node}", Cost(100, 50, 10, 5))
    latency = None if speedup is None else LatencyComparison(1e-3, 1e-3 / speedup, RatioCI(speedup, speedup - 0.1, speedup + 0.1, 30), 1)
    verdict = Verdict(outcome is Outcome.KEPT, "ok" if outcome is Outcome.KEPT else "slower", {}, latency, "subgraph", outcome=outcome)
    return Decision(cand, False, outcome, "kept" if outcome is Outcome.KEPT else "no speedup shown", verdict)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_shows_judged_left_time_and_best_speedup_on_a_terminal() -> None:
    screen = io.StringIO()
    clock = Clock()
    shown = DecisionProgress(Console(file=screen, force_terminal=True, width=200), time_budget_s=60, clock=clock)
    with shown:
        shown.on_round("bottleneck", 4)
        clock.now += 15
        shown.on_decision(decision("conv3", Outcome.KEPT, 1.5))
        shown.on_decision(decision("conv5", Outcome.LATENCY, 1.02))
        shown.on_decision(decision("conv2", Outcome.KEPT, 1.2))
        status = shown.status()
    assert status == "bottleneck: 3 judged, 2 kept, 1 left | best 1.500x [1.400, 1.600] | 45 of 60 s left"
    text = screen.getvalue()
    assert "\x1b[" in text  # drawn as a live terminal display
    assert "bottleneck: 3 judged, 2 kept, 1 left | best 1.500x [1.400, 1.600]" in text
    clock.now += 100
    assert shown.time_left() == 0.0


def test_progress_without_a_time_budget_or_a_kept_rewrite_says_less() -> None:
    clock = Clock()
    shown = DecisionProgress(Console(file=io.StringIO()), enabled=False, clock=clock)
    clock.now += 7
    shown.on_decision(decision("conv3", Outcome.NUMERICS, None))
    assert shown.status() == "bottleneck: 1 judged, 0 kept | 7 s elapsed"


def test_disabled_progress_draws_nothing() -> None:
    screen = io.StringIO()
    shown = DecisionProgress(Console(file=screen, force_terminal=True), enabled=False, time_budget_s=10)
    with shown:
        shown.on_round("bottleneck", 2)
        shown.on_decision(decision("conv3", Outcome.KEPT, 1.5))
    assert screen.getvalue() == ""
    assert shown.judged == 1


def test_progress_follows_a_real_search(sample_model) -> None:  # type: ignore[no-untyped-def]
    """The pipeline's callbacks drive it: a run that judges one candidate shows it."""
    from rewriter.pipeline import optimize
    from rewriter.validation.judge import ValidationConfig

    screen = io.StringIO()
    shown = DecisionProgress(Console(file=screen, force_terminal=True, width=200))
    with shown:
        result = optimize(sample_model, ["fuse_1x1_chain"], config=ValidationConfig(latency=False),
                          on_decision=shown.on_decision, on_round=shown.on_round)
    assert len(result.decisions) == 1
    assert shown.status().startswith("fuse_1x1_chain: 1 judged, 1 kept, 0 left | ")
    assert "fuse_1x1_chain: 1 judged, 1 kept, 0 left" in screen.getvalue()


def test_a_decision_is_one_plain_line() -> None:
    line = decision("conv5", Outcome.LATENCY, 1.02).line()
    assert line == ("bottleneck: rolled back input-side bottleneck of conv5 [nodes conv5] -- latency: no speedup shown; "
                    "speedup 1.020x [0.920, 1.120] (subgraph)")
    assert decision("conv3", Outcome.KEPT, None).line().endswith("[nodes conv3] -- kept; speedup not measured")
