"""Fill leases: one loader per missing key across the whole cluster.

A plain structure with a lock. The owner of a key grants the right to load
it to one holder at a time, for a bounded time; the grant ends when the
holder's put of the key commits, when it releases it, or when it expires
(a filler that died: the next asker takes over). Everyone else is told to
wait and ask again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

MAX_LEASES = 100_000  # beyond this, expired leases are swept before granting


class FillLeases:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._leases: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()
        self.grants = 0
        self.waits = 0

    def acquire(self, key: str, holder: str, ttl_s: float) -> tuple[bool, float]:
        """(granted, seconds to wait before asking again)."""
        with self._lock:
            now = self._clock()
            lease = self._leases.get(key)
            if lease is not None and lease[0] != holder and lease[1] > now:
                self.waits += 1
                return False, min(lease[1] - now, 0.05)
            if lease is None or lease[0] != holder:
                self.grants += 1
            if len(self._leases) >= MAX_LEASES:
                for k in [k for k, (_, exp) in self._leases.items() if exp <= now]:
                    del self._leases[k]
            self._leases[key] = (holder, now + ttl_s)
            return True, 0.0

    def release(self, key: str, holder: str) -> None:
        with self._lock:
            lease = self._leases.get(key)
            if lease is not None and lease[0] == holder:
                del self._leases[key]

    def committed(self, key: str) -> None:
        """A put of ``key`` committed: whoever held its lease is done."""
        with self._lock:
            self._leases.pop(key, None)
