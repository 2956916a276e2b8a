"""Fill leases: one loader per missing key across the whole cluster.

A plain structure with a lock. The owner of a key grants the right to load
it to one holder at a time, as a *lease*: the holder asks again with the same
id every fraction of the period while its loader runs, which renews it. The
grant ends when the holder's put of the key commits, when it releases it,
or one period after its last renewal: a filler that died, was cut off from
this node, or stopped renewing (its ``max_load_s`` passed). The next asker
then takes over. Everyone else is told who holds it and when its lease ends
unless renewed, so waiters can sleep until then instead of polling blindly.

Leases live only in the owner's memory: when the owner fails over, the new
owner knows of none, so at most one more fill may start (the first asker
there: the old holder renewing, or a waiter).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

MAX_LEASES = 100_000  # beyond this, expired leases are swept before granting


@dataclass(frozen=True)
class Lease:
    holder: str  # the holder's random id (one per fill)
    filler: str  # who it is, for people ("host pid N"); may be empty
    expires: float  # clock time at which it lapses unless renewed


@dataclass(frozen=True)
class Answer:
    """What an asker is told: granted or not, and about the current lease."""

    granted: bool
    holder: str
    filler: str
    left_s: float  # seconds until the current lease lapses unless renewed


class FillLeases:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._leases: dict[str, Lease] = {}
        self._lock = threading.Lock()
        self.grants = 0  # leases given to a new holder (loads started)
        self.waits = 0  # askers told to wait (loads saved)
        self.renewals = 0  # a holder extending its own live lease

    def acquire(self, key: str, holder: str, ttl_s: float, filler: str = "") -> Answer:
        """Grant ``key`` to ``holder`` for ``ttl_s`` (renewing its own lease), or refuse.

        A holder whose lease lapsed and was not taken by anyone gets it back:
        lapsing only matters when someone else is waiting.
        """
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        with self._lock:
            now = self._clock()
            lease = self._leases.get(key)
            if lease is not None and lease.holder != holder and lease.expires > now:
                self.waits += 1
                return Answer(False, lease.holder, lease.filler, lease.expires - now)
            if lease is not None and lease.holder == holder:
                filler = filler or lease.filler  # a renewal need not repeat it
                if lease.expires > now:
                    self.renewals += 1
            else:
                self.grants += 1
            if len(self._leases) >= MAX_LEASES:
                for k in [k for k, v in self._leases.items() if v.expires <= now]:
                    del self._leases[k]
            self._leases[key] = Lease(holder, filler, now + ttl_s)
            return Answer(True, holder, filler, ttl_s)

    def release(self, key: str, holder: str) -> None:
        """``holder`` is done (its loader returned or raised): the next asker may load."""
        with self._lock:
            lease = self._leases.get(key)
            if lease is not None and lease.holder == holder:
                del self._leases[key]

    def committed(self, key: str) -> None:
        """A put of ``key`` committed: whoever held its lease is done."""
        with self._lock:
            self._leases.pop(key, None)

    def holder(self, key: str) -> Lease | None:
        """The live lease on ``key``, if any."""
        with self._lock:
            lease = self._leases.get(key)
            return lease if lease is not None and lease.expires > self._clock() else None
