"""The terminal progress display: a live count of judged candidates while a run works.

It listens to the search's per-decision INFO log records ("kept ..." / "rolled back ..."), so the
search knows nothing about it. The CLI shows it only when stderr is a terminal and ``--quiet`` is not
given; it leaves logging as it found it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class _DecisionCounter(logging.Handler):
    """Advances a progress task on each decision the search logs ("kept ..." / "rolled back ...")."""

    def __init__(self, progress: Any, task: Any, width: int) -> None:
        super().__init__(logging.INFO)
        self.progress, self.task, self.width, self.count = progress, task, width, 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage().splitlines()[0] if record.getMessage() else ""
            if text.startswith(("kept ", "rolled back ")):
                self.count += 1
                line = f"{self.count} candidate(s) judged; last: {text}"
                if len(line) > self.width:
                    line = line[: max(self.width - 1, 0)] + "\u2026"
                self.progress.update(self.task, advance=1, description=line)
        except Exception:
            self.handleError(record)


@contextmanager
def decision_progress(console: Any, enabled: bool) -> Iterator[None]:
    """A rich progress line on ``console`` (stderr) counting judged candidates, while the body runs.

    Off unless ``enabled`` (the CLI enables it only when stderr is a terminal and ``--quiet`` is not
    given), so logs and CI output stay plain. It listens to the search's per-decision INFO records
    without letting them through to the other handlers unless those were already at INFO.
    """
    if not enabled:
        yield
        return
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    search_log = logging.getLogger("rewriter.search")  # where each decision is logged
    parent = logging.getLogger("rewriter")
    effective = parent.getEffectiveLevel()
    saved_handlers = [(h, h.level) for h in parent.handlers]
    saved_level = search_log.level
    progress = Progress(SpinnerColumn(), TimeElapsedColumn(), TextColumn("{task.description}"), console=console, transient=True)
    task = progress.add_task("judging candidates", total=None)
    counter = _DecisionCounter(progress, task, max(20, console.width - 16))
    try:
        for h, level in saved_handlers:
            h.setLevel(max(level, effective))
        search_log.addHandler(counter)
        search_log.setLevel(min(logging.INFO, effective))
        with progress:
            yield
    finally:
        search_log.removeHandler(counter)
        search_log.setLevel(saved_level)
        for h, level in saved_handlers:
            h.setLevel(level)
