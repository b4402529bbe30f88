"""The terminal progress display (rewriter.progress): it counts judged candidates and leaves logging as it was."""

from __future__ import annotations

import io
import logging

from rewriter.progress import decision_progress


def test_progress_counts_decisions_on_a_terminal_and_restores_logging() -> None:
    from rich.console import Console

    search_log = logging.getLogger("rewriter.search")
    parent = logging.getLogger("rewriter")
    sink = io.StringIO()
    handler = logging.StreamHandler(sink)
    parent.addHandler(handler)
    parent.setLevel(logging.WARNING)
    levels = (search_log.level, handler.level)
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=100)
    with decision_progress(console, enabled=True):
        search_log.info("%s %s: %s", "kept", "fuse a + b", "exact")
        search_log.info("%s %s: %s", "rolled back", "fuse c + d", "slower")
        search_log.info("fuse_1x1_chain: whole-model speedup does not pay")  # not a decision
    parent.removeHandler(handler)
    assert "2 candidate(s) judged" in screen.getvalue()
    assert sink.getvalue() == ""  # INFO records did not leak to the WARNING-level handler
    assert (search_log.level, handler.level) == levels
    quiet = io.StringIO()
    with decision_progress(Console(file=quiet, force_terminal=True), enabled=False):
        search_log.info("%s %s: %s", "kept", "x", "y")
    assert quiet.getvalue() == ""


def test_progress_counts_the_decisions_a_real_search_makes(sample_model) -> None:  # type: ignore[no-untyped-def]
    """The display listens where the search logs its decisions: a run that judges one candidate shows it."""
    from rich.console import Console

    from rewriter.pipeline import optimize
    from rewriter.validation.judge import ValidationConfig

    screen = io.StringIO()
    with decision_progress(Console(file=screen, force_terminal=True, width=200), enabled=True):
        result = optimize(sample_model, ["fuse_1x1_chain"], config=ValidationConfig(latency=False))
    assert len(result.decisions) == 1
    assert "1 candidate(s) judged; last: kept fuse" in screen.getvalue()
