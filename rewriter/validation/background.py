"""Proof work that times nothing, run ahead of need on one worker thread.

A run's proof has parts that do not depend on the search: the original's reference outputs and the graph
onnxruntime deploys for it. Started on a worker thread when the run begins, they overlap the passes' own work
(finding and applying rewrites, in Python) instead of following it; at the closing, the result's deployed graph
is read while its numerics run. onnxruntime releases the interpreter lock while it builds and runs a session,
so the two threads share the machine's cores.

Nothing may run beside a latency measurement: :meth:`Worker.quiet` waits for every task started so far, and the
judge calls it before each timing. A task's error is left in its future: the reference outputs are then computed
again in the open, where the error belongs; a deployed graph that could not be read is timed instead.
"""

from __future__ import annotations

import contextvars
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class Worker:
    """One worker thread (started on first use), and the tasks given to it."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._tasks: list[Future[Any]] = []
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Run ``fn(*args)`` on the worker, in a copy of the caller's context (its reference-thread limit,
        shared payloads and logging)."""
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnx-bottleneck-proof")
            task = self._pool.submit(contextvars.copy_context().run, fn, *args)
            self._tasks = [t for t in self._tasks if not t.done()] + [task]
        return task

    def quiet(self) -> None:
        """Wait until no task runs (before a timing: nothing may run beside it)."""
        with self._lock:
            pending = [t for t in self._tasks if not t.done()]
        if pending:
            log.debug("waiting for %d proof task(s) before timing", len(pending))
            wait(pending)

    def close(self) -> None:
        """Wait for the tasks and stop the thread."""
        with self._lock:
            pool, self._pool, self._tasks = self._pool, None, []
        if pool is not None:
            pool.shutdown(wait=True)


def result_or_none(task: Future[T] | None) -> T | None:
    """The task's result, or ``None`` when there is no task or it failed (the caller falls back: for a deployed
    graph, to a timing)."""
    if task is None:
        return None
    try:
        return task.result()
    except Exception as exc:  # noqa: BLE001 -- the caller falls back
        log.debug("a proof task failed (%s)", exc)
        return None
