"""Proof work that times nothing, run ahead of need on one worker thread.

A run's proof has parts that do not depend on the search: the original's reference outputs and the graph
onnxruntime deploys for it. Started on a worker thread when the run begins, they overlap the passes' own work
(finding and applying rewrites, in Python) instead of following it; at the closing, the result's deployed graph
is read while its numerics run. onnxruntime releases the interpreter lock while it builds and runs a session,
so the two threads share the machine's cores.

Nothing may run beside a latency measurement: :meth:`Worker.quiet` waits for every task started so far, and the
judge calls it before each timing. A task's error is left in its future: the reference outputs are then computed
again in the open, where the error belongs; a deployed graph that could not be read is timed instead.

Overlap costs memory: a session of a big model beside the search (or beside another session) adds its whole
footprint to the run's peak. A worker for a model over :data:`OVERLAP_BYTES` runs nothing ahead: each task runs
in the thread that first asks for its result, after the search has let go of its graph views.
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

#: The largest model whose proof work overlaps the search. An optimized onnxruntime session of a model takes about
#: three times its bytes, the search's graph views about as much again: past ~50 MB the two together leave the
#: memory bound of a run (400 MB + 3x the model's bytes), so a bigger model's tasks wait to be asked for.
OVERLAP_BYTES = 48 << 20


class _OnDemand(Future):  # type: ignore[type-arg]
    """A task that runs in the first thread asking for its result (a worker that does not overlap)."""

    def __init__(self, call: Callable[[], Any]) -> None:
        super().__init__()
        self._call: Callable[[], Any] | None = call
        self._run_lock = threading.Lock()

    def result(self, timeout: float | None = None) -> Any:
        with self._run_lock:
            call, self._call = self._call, None
            if call is not None:
                try:
                    self.set_result(call())
                except Exception as exc:  # noqa: BLE001 -- kept in the future, as a worker's would be
                    self.set_exception(exc)
        return super().result(timeout)


class Worker:
    """One worker thread (started on first use), and the tasks given to it."""

    def __init__(self, overlap: bool = True) -> None:
        #: Whether tasks run ahead on the worker thread; else each runs when its result is first asked for.
        self.overlap = overlap
        self._pool: ThreadPoolExecutor | None = None
        self._tasks: list[Future[Any]] = []
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., T], *args: Any, light: bool = False) -> Future[T]:
        """Run ``fn(*args)`` on the worker, in a copy of the caller's context (its reference-thread limit,
        shared payloads and logging). ``light``: a task that runs ahead even on a worker that does not overlap
        (one that holds about the model's bytes, where an optimized session holds three times them)."""
        if not self.overlap and not light:
            context = contextvars.copy_context()
            return _OnDemand(lambda: context.run(fn, *args))
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
