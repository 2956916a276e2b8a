"""The near-cache: hot tensors kept in the worker process, revalidated per get.

Strict mode (the only mode so far): every hit asks the owner node for the
key's current version with a header-only request (no bulk bytes move) and
serves the local copy only if it is still that version. So a get through
the near-cache returns exactly what a get from the node would, at the cost
of one small round trip instead of the tensor's bytes.

A plain structure with a lock: LRU order, a strict byte budget (an entry
larger than the budget is simply not kept), and copies on the way out so
that a caller writing into its result cannot change what others get.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class Near:
    array: np.ndarray  # owned by the cache, never handed out
    version: int


class NearCache:
    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"near-cache capacity must be >= 0 bytes, got {capacity}")
        self.capacity = capacity
        self._entries: OrderedDict[str, Near] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def bytes_used(self) -> int:
        return self._bytes

    def lookup(self, key: str) -> Near | None:
        with self._lock:
            near = self._entries.get(key)
            if near is not None:
                self._entries.move_to_end(key)
            return near

    def store(self, key: str, array: np.ndarray, version: int) -> None:
        """Keep a private copy of ``array`` at ``version`` (evicting LRU entries)."""
        if array.nbytes > self.capacity:
            self.drop(key)
            return
        copy = array.copy(order="K")
        with self._lock:
            self._drop_locked(key)
            while self._entries and self._bytes + copy.nbytes > self.capacity:
                _, old = self._entries.popitem(last=False)
                self._bytes -= old.array.nbytes
            self._entries[key] = Near(copy, version)
            self._bytes += copy.nbytes

    def drop(self, key: str) -> None:
        with self._lock:
            self._drop_locked(key)

    def _drop_locked(self, key: str) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= old.array.nbytes
