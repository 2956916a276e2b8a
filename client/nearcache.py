"""The near-cache: hot tensors kept in the worker process.

Two modes (``ClientConfig.near_cache_mode``):

* **strict** (default): every hit asks the owner node for the key's current
  version with a header-only request (no bulk bytes move) and serves the
  local copy only if it is still that version. A get through the near-cache
  returns exactly what a get from the node would, for one small round trip.
* **watch**: hits are served with no call at all while the router's event
  stream (client/watch.py) is live; puts, deletes and invalidations anywhere
  in the cluster arrive on that stream and drop the copies they make stale.
  Staleness is bounded by the push delay (docs/consistency.md has the
  measured figure). While the stream is down, watch mode behaves as strict.

A plain structure with a lock: LRU order, a strict byte budget (an entry
larger than the budget is simply not kept), and copies on the way out so
that a caller writing into its result cannot change what others get.

The fill race (watch mode): a get reads version v from a node while an event
for v+1 is on its way; if the event is applied before the get stores v, the
copy would be stale with no event left to drop it. So every event bumps a
sequence number and is remembered (bounded) per key, and ``store`` takes the
sequence number read *before* the get began: a copy older than an event seen
since then, or older than a reset or invalidation since then, is not kept.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

# Per-key events remembered for the fill race; when more arrive, the oldest
# are forgotten and stores that began before them are refused (safe side).
_RECENT_EVENTS = 65536


@dataclass(frozen=True, slots=True)
class Near:
    array: np.ndarray  # owned by the cache, never handed out
    version: int
    logical: str = ""  # TensorMeta.logical_dtype: the torch dtype it was written as


class NearCache:
    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"near-cache capacity must be >= 0 bytes, got {capacity}")
        self.capacity = capacity
        self._entries: OrderedDict[str, Near] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._seq = 0  # bumped by every event
        self._recent: OrderedDict[str, tuple[int, int]] = OrderedDict()  # key -> (version, seq)
        self._forgot_seq = 0  # newest seq dropped from _recent
        self._barrier_seq = 0  # newest reset or invalidation
        self.dropped_by_events = 0

    @property
    def bytes_used(self) -> int:
        return self._bytes

    @property
    def seq(self) -> int:
        """Take before a fill; pass to ``store``."""
        return self._seq

    def lookup(self, key: str) -> Near | None:
        with self._lock:
            near = self._entries.get(key)
            if near is not None:
                self._entries.move_to_end(key)
            return near

    def store(
        self, key: str, array: np.ndarray, version: int, seq: int | None = None, logical: str = ""
    ) -> None:
        """Keep a private copy of ``array`` at ``version`` (evicting LRU entries).

        ``seq``: the ``seq`` read before the value was fetched; the copy is
        refused if an event since then may have made it stale.
        """
        if array.nbytes > self.capacity:
            self.drop(key)
            return
        copy = array.copy(order="K")
        with self._lock:
            if seq is not None and self._stale_locked(key, version, seq):
                self._drop_locked(key)
                return
            self._drop_locked(key)
            while self._entries and self._bytes + copy.nbytes > self.capacity:
                _, old = self._entries.popitem(last=False)
                self._bytes -= old.array.nbytes
            self._entries[key] = Near(copy, version, logical)
            self._bytes += copy.nbytes

    def drop(self, key: str) -> None:
        with self._lock:
            self._drop_locked(key)

    # -- events (watch mode) --------------------------------------------------
    def key_event(self, key: str, version: int) -> None:
        """``key`` is now at ``version`` (0: deleted) somewhere in the cluster."""
        with self._lock:
            self._seq += 1
            near = self._entries.get(key)
            if near is not None and (version == 0 or near.version < version):
                self._drop_locked(key)
                self.dropped_by_events += 1
            prev = self._recent.pop(key, None)
            top = version if version else (1 << 64) - 1  # a delete outranks every copy
            if prev is not None:
                top = max(top, prev[0])
            self._recent[key] = (top, self._seq)
            while len(self._recent) > _RECENT_EVENTS:
                _, (_, old_seq) = self._recent.popitem(last=False)
                self._forgot_seq = max(self._forgot_seq, old_seq)

    def drop_prefix(self, prefix: str) -> int:
        """Forget every copy of a key under ``prefix`` (an invalidation)."""
        with self._lock:
            self._seq += 1
            self._barrier_seq = self._seq
            victims = [k for k in self._entries if k.startswith(prefix)]
            for k in victims:
                self._drop_locked(k)
            self.dropped_by_events += len(victims)
            return len(victims)

    def clear(self) -> None:
        """Forget everything (the event stream broke or fell behind)."""
        self.drop_prefix("")

    def _stale_locked(self, key: str, version: int, seq: int) -> bool:
        if self._barrier_seq > seq or self._forgot_seq > seq:
            return True
        seen = self._recent.get(key)
        return seen is not None and seen[1] > seq and seen[0] > version

    def _drop_locked(self, key: str) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= old.array.nbytes
