"""The terminal progress display of a run, driven by the search's decisions.

:class:`DecisionProgress` is handed to the pipeline as its ``on_round`` and ``on_decision`` callbacks
(:func:`rewriter.pipeline.optimize`), so the search knows nothing about it. While the run works it shows one
live line on a console (stderr): the pass, candidates judged and left in the current round, the best speedup
a kept rewrite has shown so far, and the time left of ``--time-budget``. The CLI enables it only when stderr
is a terminal and ``--quiet`` is not given; disabled, it does nothing, so logs and CI output stay plain (the
plain per-decision lines of ``-v`` are the search's log records, :meth:`rewriter.decision.Decision.line`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from rich.progress import ProgressColumn, Task
from rich.text import Text

from rewriter.decision import Decision
from rewriter.model import Model
from rewriter.validation.stats import RatioCI


class DecisionProgress:
    """A live status line counting decisions; a context manager around the run.

    ``time_budget_s``: the run's ``--time-budget`` (``None``: unbounded); the time left is counted from
    entering the context. ``clock`` is for tests."""

    def __init__(self, console: Any, *, enabled: bool = True, time_budget_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.console, self.enabled, self.time_budget_s, self.clock = console, enabled, time_budget_s, clock
        self.pass_name = ""
        self.judged = 0
        self.kept = 0
        self.left: int | None = None
        self.best: RatioCI | None = None
        self.start = clock()
        self._progress: Any = None

    # -- the pipeline's callbacks ------------------------------------------------------------------------
    def on_round(self, pass_name: str, candidates: int) -> None:
        """A round of ``pass_name`` starts with ``candidates`` to go through."""
        self.pass_name, self.left = pass_name, candidates
        self._refresh()

    def on_decision(self, decision: Decision, model: Model | None = None) -> None:
        """One candidate was judged."""
        self.judged += 1
        self.pass_name = decision.candidate.pass_name or self.pass_name
        if self.left is not None:
            self.left = max(0, self.left - 1)
        v = decision.verdict
        if decision.kept:
            self.kept += 1
            if v is not None and v.latency is not None and (self.best is None or v.latency.ci.speedup > self.best.speedup):
                self.best = v.latency.ci
        self._refresh()

    # -- what is shown -----------------------------------------------------------------------------------
    def time_left(self) -> float | None:
        """Seconds left of the time budget (``None`` without one)."""
        if self.time_budget_s is None:
            return None
        return max(0.0, self.time_budget_s - (self.clock() - self.start))

    def status(self) -> str:
        """The status line, short enough for an 80-column terminal, e.g. ``bottleneck: 10 judged, 2 kept, 1 left
        | best 1.942x [1.806, 2.051] | 24 of 30 s left`` ("left": candidates left in the pass's current round;
        "best": the best speedup CI a kept rewrite has shown; the time left of ``--time-budget``, else the time
        elapsed)."""
        parts = [f"{self.pass_name + ': ' if self.pass_name else ''}{self.judged} judged, {self.kept} kept"
                 + ("" if self.left is None else f", {self.left} left")]
        if self.best is not None:
            parts.append(f"best {self.best}")
        left = self.time_left()
        parts.append(f"{self.clock() - self.start:.0f} s elapsed" if left is None else f"{left:.0f} of {self.time_budget_s:g} s left")
        return " | ".join(parts)

    def _refresh(self) -> None:
        if self._progress is not None:
            self._progress.refresh()

    # -- the display -------------------------------------------------------------------------------------
    def __enter__(self) -> DecisionProgress:
        self.start = self.clock()
        if not self.enabled:
            return self
        from rich.progress import Progress, SpinnerColumn

        self._progress = Progress(SpinnerColumn(), _StatusColumn(self), console=self.console, transient=True)
        self._progress.add_task("run", total=None)
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


class _StatusColumn(ProgressColumn):
    """The status line, rendered afresh at each refresh (so the time left counts down between decisions)."""

    def __init__(self, owner: DecisionProgress) -> None:
        super().__init__()
        self.owner = owner

    def render(self, task: Task) -> Text:
        return Text(self.owner.status(), no_wrap=True, overflow="ellipsis")
