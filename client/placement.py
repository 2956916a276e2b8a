"""The client's view of placement: the current ring snapshot, refreshed on demand.

A request takes one snapshot (``current()``) and places every key of that
request with it. When a node answers "stale epoch", the client calls
``refresh(seen)``: only the first thread that saw the stale ring fetches a
new one; the others find it already replaced and reuse it.
"""

from __future__ import annotations

import threading

from tensorcache import wire
from tensorcache.client.transport import RouterTransport
from tensorcache.errors import Unavailable
from tensorcache.ring import Ring


class Placement:
    def __init__(self, router: RouterTransport, timeout_s: float) -> None:
        self._router = router
        self._timeout_s = timeout_s
        self._ring: Ring | None = None
        self._lock = threading.Lock()
        self.refreshes = 0
        self.stripe_size = 0

    def current(self) -> Ring:
        ring = self._ring
        return ring if ring is not None else self.refresh(None)

    def refresh(self, seen: Ring | None, min_epoch: int = 0) -> Ring:
        """Fetch a new snapshot unless another thread already replaced ``seen``."""
        with self._lock:
            ring = self._ring
            if ring is not None and ring is not seen and ring.epoch >= min_epoch:
                return ring
            snap = self._router.get_ring(self._timeout_s)
            ring = wire.ring_from_snapshot(snap)
            self.stripe_size = snap.stripe_size
            self._ring = ring
            self.refreshes += 1
            if not ring.members:
                raise Unavailable(f"router {self._router.address} has no nodes in its ring yet")
            return ring
