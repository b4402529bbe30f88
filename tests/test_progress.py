"""The terminal progress display (rewriter.progress): it counts judged candidates and leaves logging as it was."""

from __future__ import annotations

import io
import logging

from rewriter.progress import decision_progress


def test_progress_counts_decisions_on_a_terminal_and_restores_logging() -> None:
    from rich.console import Console

    pipeline_log = logging.getLogger("rewriter.pipeline")
    parent = logging.getLogger("rewriter")
    sink = io.StringIO()
    handler = logging.StreamHandler(sink)
    parent.addHandler(handler)
    parent.setLevel(logging.WARNING)
    levels = (pipeline_log.level, handler.level)
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=100)
    with decision_progress(console, enabled=True):
        pipeline_log.info("%s %s: %s", "kept", "fuse a + b", "exact")
        pipeline_log.info("%s %s: %s", "rolled back", "fuse c + d", "slower")
        pipeline_log.info("fuse_1x1_chain: whole-model speedup does not pay")  # not a decision
    parent.removeHandler(handler)
    assert "2 candidate(s) judged" in screen.getvalue()
    assert sink.getvalue() == ""  # INFO records did not leak to the WARNING-level handler
    assert (pipeline_log.level, handler.level) == levels
    quiet = io.StringIO()
    with decision_progress(Console(file=quiet, force_terminal=True), enabled=False):
        pipeline_log.info("%s %s: %s", "kept", "x", "y")
    assert quiet.getvalue() == ""
