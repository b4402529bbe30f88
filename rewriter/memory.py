"""Returning the C heap's free pages to the system between big allocations."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from collections.abc import Callable

_TRIM: Callable[[int], int] | None = None
_LOOKED = False
_LIBC: ctypes.CDLL | None = None


def _libc() -> ctypes.CDLL | None:
    global _LIBC, _LOOKED
    if not _LOOKED:
        _LOOKED = True
        name = ctypes.util.find_library("c")
        try:
            _LIBC = ctypes.CDLL(name) if name else None
        except OSError:
            _LIBC = None
    return _LIBC


def give_back_memory(collect: bool = False) -> None:
    """Return the C heap's free pages to the system (glibc ``malloc_trim``; nothing where there is none).

    A freed onnxruntime session or serialized model leaves its pages with the allocator, which reuses them only
    for allocations that fit: a run of sessions of a big model then stacks their high-water marks. Called after
    each big one is freed (sessions, serialized copies, a committed fork's graph).

    ``collect``: run Python's cycle collector first. An onnx-graphsurgeon graph is a web of cycles (nodes and
    tensors point at each other), so a dropped graph view -- and every weight array it loaded -- is freed only
    when the collector next runs a full pass, which may be never before the run ends: on ResNet-50 that left
    300 MB of dead arrays beside the closing's sessions."""
    global _TRIM
    if collect:
        gc.collect()
    if _TRIM is None:
        libc = _libc()
        _TRIM = getattr(libc, "malloc_trim", None) if libc is not None else None
    if _TRIM is not None:
        _TRIM(0)
