"""The run's time budget: search end, screening share, pace."""

from __future__ import annotations

import time

import pytest

from rewriter.deadline import PACE_WINDOW, Deadline


def test_an_unbounded_deadline_always_fits() -> None:
    d = Deadline()
    d.record(1e6)
    assert d.fits(1e9) and not d.search_over() and not d.over()
    assert d.search_end is None and d.screen_end is None and d.end is None


def test_search_end_keeps_the_closing_reserve_and_screening_its_share() -> None:
    d = Deadline(100.0, reserve_s=30.0, screen_share=0.25, start=1000.0)
    assert (d.search_end, d.screen_end, d.end) == (1070.0, 1025.0, 1100.0)
    assert Deadline(10.0, reserve_s=30.0, start=0.0).search_end == 0.0  # a reserve larger than the budget: no search


def test_pace_is_the_slowest_of_the_last_few_candidates() -> None:
    d = Deadline(100.0)
    assert d.pace == 0.0
    d.record(5.0)
    for _ in range(PACE_WINDOW - 1):
        d.record(1.0)
    assert d.pace == 5.0
    d.record(1.0)  # the slow one leaves the window
    assert d.pace == 1.0


def test_fits_counts_extra_work_and_the_pace() -> None:
    now = time.perf_counter()
    d = Deadline(10.0, start=now)
    assert d.fits() and d.fits(5.0)
    assert not d.fits(11.0)
    d.record(9.5)
    assert not d.fits(1.0)  # 1 s of find plus a 9.5 s candidate ends past the 10 s budget
    assert Deadline(0.0, start=now - 1.0).search_over() and Deadline(0.0, start=now - 1.0).over()


@pytest.mark.parametrize("budget", [0.0, 1.0])
def test_an_expired_budget_fits_nothing(budget: float) -> None:
    d = Deadline(budget, start=time.perf_counter() - 2.0)
    assert not d.fits() and d.search_over() and d.over()
