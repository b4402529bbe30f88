"""The per-machine timing lock: one latency measurement at a time on a machine.

Jobs that share a machine (``optimize-many``'s local workers, Ray tasks on one node, two runs started
by hand) lock the same file around each measurement (see
:func:`rewriter.validation.latency.timing_lock`). An ``flock`` is per machine by construction, needs no
coordinator, and the operating system releases the lock of a process that dies while holding it.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)


def default_lock_path() -> Path:
    """The machine-wide timing lock file (in the system's temporary folder)."""
    return Path(tempfile.gettempdir()) / "onnx-bottleneck-timing.lock"


class MachineLock:
    """An exclusive advisory lock on a file (``flock``), reusable as a context manager.

    Every process of the machine that locks the same path waits for the others, whichever program started
    it (a local pool, Ray tasks, two runs at once), and the operating system releases the lock of a process
    that dies. Where the shared file cannot be opened (another user's), a per-user file is used instead.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path is not None else default_lock_path()
        self._fd: int | None = None

    def _open(self) -> int:
        flags = os.O_RDONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            return os.open(self.path, flags, 0o644)
        except PermissionError:
            uid = os.getuid() if hasattr(os, "getuid") else os.getpid()
            personal = self.path.with_name(f"{self.path.stem}-{uid}{self.path.suffix}")
            log.info("cannot open %s; timing lock in %s instead", self.path, personal)
            self.path = personal
            return os.open(self.path, flags, 0o644)

    def __enter__(self) -> MachineLock:
        if self._fd is not None:
            raise RuntimeError("MachineLock is not re-entrant")
        fd = self._open()
        try:
            _lock_fd(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                _unlock_fd(fd)
            finally:
                os.close(fd)


try:
    import fcntl

    def _lock_fd(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_EX)

    def _unlock_fd(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)

except ImportError:  # pragma: no cover - Windows
    import msvcrt

    def _lock_fd(fd: int) -> None:
        while True:
            try:
                msvcrt.locking(fd, msvcrt.LK_LOCK, 1)
                return
            except OSError:  # LK_LOCK gives up after 10 s; keep waiting
                continue

    def _unlock_fd(fd: int) -> None:
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
