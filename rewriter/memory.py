"""Returning the C heap's free pages to the system between big allocations."""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable

_TRIM: Callable[[int], int] | None = None
_LOOKED = False


def give_back_memory() -> None:
    """Return the C heap's free pages to the system (glibc ``malloc_trim``; nothing where there is none).

    A freed onnxruntime session or serialized model leaves its pages with the allocator, which reuses them only
    for allocations that fit: a run of sessions of a big model then stacks their high-water marks. Called after
    each big one is freed (sessions, serialized copies, a committed fork's graph)."""
    global _TRIM, _LOOKED
    if not _LOOKED:
        _LOOKED = True
        name = ctypes.util.find_library("c")
        try:
            _TRIM = getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
        except OSError:
            _TRIM = None
    if _TRIM is not None:
        _TRIM(0)
