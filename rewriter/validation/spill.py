"""Arrays kept for a run, within a memory budget: what does not fit waits on disk.

A lossy search derives much from calibration activations -- samples of every conv's input patches, moments,
fits -- and reuses it across candidates and model versions. Kept in memory, that data is most of a run's peak
(open-nsfw: ~900 MB of 1.2 GB); recomputed, it costs a calibration run each time. :class:`SpillStore` keeps
the most recently used values in memory up to ``memory_bytes`` and writes the others once to a private
temporary folder, from which they are read back (from the page cache, usually) when next asked for.

Values are arrays or nests of them (tuples, lists, and anything else pickle takes). They are treated as
immutable: an array is stored read-only, so a caller that would change a cached value in place fails loudly
instead of changing what the disk copy no longer matches. A value stored under several keys (the same object)
is held, and written, once.
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import tempfile
import weakref
from collections import OrderedDict
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def nbytes(value: Any) -> int:
    """Bytes of the arrays in ``value`` (nested lists and tuples)."""
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, (list, tuple)):
        return sum(nbytes(v) for v in value)
    return 0


def _freeze(value: Any) -> None:
    """Make the arrays in ``value`` read-only."""
    if isinstance(value, np.ndarray):
        value.flags.writeable = False
    elif isinstance(value, (list, tuple)):
        for v in value:
            _freeze(v)


@dataclass(eq=False)
class _Slot:
    """One stored value: in memory (``value``), on disk (``path``) or both, and the keys that name it."""

    value: Any
    size: int
    keys: set[Hashable] = field(default_factory=set)
    path: str | None = None
    resident: bool = True


class SpillStore:
    """A mapping of keys to values holding at most ``memory_bytes`` of arrays in memory (the most recently
    used; one value is always kept, however big), the rest on disk until asked for."""

    def __init__(self, memory_bytes: int) -> None:
        self.memory_bytes = memory_bytes
        self._slots: dict[Hashable, _Slot] = {}
        self._by_object: dict[int, _Slot] = {}  # resident values by identity: one slot per object
        self._recent: OrderedDict[int, _Slot] = OrderedDict()  # resident slots, least recently used first
        self._in_memory = 0
        self._folder: str | None = None
        #: Values written to disk and read back, for the record.
        self.spilled = 0
        self.loaded = 0

    # -- mapping ------------------------------------------------------------------------------------------
    def __contains__(self, key: Hashable) -> bool:
        return key in self._slots

    def __iter__(self) -> Iterator[Hashable]:
        return iter(list(self._slots))

    def __len__(self) -> int:
        return len(self._slots)

    def __getitem__(self, key: Hashable) -> Any:
        slot = self._slots[key]
        if not slot.resident:
            assert slot.path is not None
            with open(slot.path, "rb") as fh:
                slot.value = pickle.load(fh)
            _freeze(slot.value)
            slot.resident = True
            self._by_object[id(slot.value)] = slot
            self._in_memory += slot.size
            self.loaded += 1
        self._touch(slot)
        self._shrink(keep=slot)
        return slot.value

    def __setitem__(self, key: Hashable, value: Any) -> None:
        if key in self._slots:
            self.pop(key)
        slot = self._by_object.get(id(value))
        if slot is None or slot.value is not value:
            _freeze(value)
            slot = _Slot(value, nbytes(value))
            self._by_object[id(value)] = slot
            self._in_memory += slot.size
        slot.keys.add(key)
        self._slots[key] = slot
        self._touch(slot)
        self._shrink(keep=slot)

    def pop(self, key: Hashable, default: Any = None) -> Any:
        """Forget ``key``; its value's memory and file go with its last key."""
        slot = self._slots.pop(key, None)
        if slot is None:
            return default
        slot.keys.discard(key)
        value = slot.value
        if not slot.keys:
            if slot.resident:
                self._release(slot)
            if slot.path is not None:
                os.unlink(slot.path)
        return value

    def size(self, key: Hashable) -> int:
        """Bytes of the arrays stored under ``key`` (in memory or not)."""
        return self._slots[key].size

    @property
    def in_memory(self) -> int:
        """Bytes of arrays held in memory now."""
        return self._in_memory

    # -- budget ------------------------------------------------------------------------------------------
    def _touch(self, slot: _Slot) -> None:
        self._recent[id(slot)] = slot
        self._recent.move_to_end(id(slot))

    def _release(self, slot: _Slot) -> None:
        """Drop the in-memory value of a slot (its file, if any, stays)."""
        self._recent.pop(id(slot), None)
        if self._by_object.get(id(slot.value)) is slot:
            del self._by_object[id(slot.value)]
        self._in_memory -= slot.size
        slot.value, slot.resident = None, False

    def _shrink(self, keep: _Slot) -> None:
        """Write the least recently used values to disk until the budget holds (``keep`` stays)."""
        for slot in list(self._recent.values()):
            if self._in_memory <= self.memory_bytes:
                return
            if slot is keep or slot.size == 0:
                continue
            if slot.path is None:
                slot.path = self._write(slot.value)
                self.spilled += 1
            self._release(slot)

    def _write(self, value: Any) -> str:
        if self._folder is None:
            self._folder = tempfile.mkdtemp(prefix="onnx-bottleneck-spill-")
            weakref.finalize(self, shutil.rmtree, self._folder, True)
            log.debug("calibration data past %d MB spills to %s", self.memory_bytes >> 20, self._folder)
        fd, path = tempfile.mkstemp(dir=self._folder, suffix=".pkl")
        with os.fdopen(fd, "wb") as fh:
            pickle.dump(value, fh, protocol=pickle.HIGHEST_PROTOCOL)
        return path

    def close(self) -> None:
        """Forget everything and remove the folder."""
        for key in list(self._slots):
            self.pop(key)
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None
