"""The time budget of one optimization, created once and handed to whatever spends it.

``budget_s`` covers the whole call. The search must end ``reserve_s`` before it (room for the closing
end-to-end measurements); screening may use up to ``screen_share`` of it. The deadline keeps the pace of
the last few judged candidates, so nothing is started that would, at that pace, end past the search's end.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

#: Candidates whose durations set the pace (the slowest of them).
PACE_WINDOW = 8


@dataclass
class Deadline:
    """A time budget: ``None`` means unbounded (every check passes)."""

    budget_s: float | None = None
    #: Seconds kept back for the closing measurements after the search.
    reserve_s: float = 0.0
    #: Share of the budget screening may use.
    screen_share: float = 0.5
    start: float = field(default_factory=time.perf_counter)
    _paces: deque[float] = field(default_factory=lambda: deque(maxlen=PACE_WINDOW), repr=False)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    @property
    def search_end(self) -> float | None:
        """When the search must stop (``start + max(0, budget - reserve)``), or ``None``."""
        return None if self.budget_s is None else self.start + max(0.0, self.budget_s - self.reserve_s)

    @property
    def screen_end(self) -> float | None:
        """When screening must stop, or ``None``."""
        return None if self.budget_s is None else self.start + self.screen_share * self.budget_s

    @property
    def end(self) -> float | None:
        """The end of the whole budget (closing measurements included), or ``None``."""
        return None if self.budget_s is None else self.start + self.budget_s

    @property
    def pace(self) -> float:
        """The slowest of the last ``PACE_WINDOW`` judged candidates, in seconds (0 before any)."""
        return max(self._paces, default=0.0)

    def record(self, seconds: float) -> None:
        """One candidate took ``seconds`` to try."""
        self._paces.append(seconds)

    def fits(self, extra_s: float = 0.0) -> bool:
        """Whether ``extra_s`` seconds of work and one more candidate at the current pace end before the
        search's end."""
        end = self.search_end
        return end is None or time.perf_counter() + extra_s + self.pace <= end

    def search_over(self) -> bool:
        end = self.search_end
        return end is not None and time.perf_counter() > end

    def over(self) -> bool:
        """The whole budget is spent (closing reserve included)."""
        end = self.end
        return end is not None and time.perf_counter() > end
