"""Lease guard: a node that was stopped past its lease serves nothing until it
knows whether the ring went on without it.

The router drops a node whose heartbeats stop for a lease (``ttl``) and
gives its keys to others; clients that learn the new ring write there. A
node frozen meanwhile (SIGSTOP, a VM pause, a swap storm) and then resumed
still holds the old copies and the old ring. Requests queued in its sockets
during the freeze, from clients that have not refreshed their ring either,
are answered first, before its membership thread has run even once: the
soak saw stale reads exactly there (issue #8, 4-6 s after a pause). The
membership thread does notice (the router answers "unknown", and the node
hides every entry it holds as suspect: ``RingView.mark_gap``), but only
after those requests.

So the data path asks this guard before serving. It serves at once while
the last renewal that succeeded began less than a lease ago: the router
cannot have dropped the node yet. Past that, it serves only if the process
ran all along (the router is unreachable or slow, and every request would
fail otherwise: the node keeps serving, as docs/operations.md says). If the
process stalled since that renewal, requests wait until a heartbeat that
began after the stall has finished (the router answered and, if it had
forgotten the node, the gap is marked), bounded by ``wait_s``; after that
they fail with ``Unavailable`` and the client retries elsewhere.

A stall is a gap of more than ``STALL_S`` between two observations of the
clock: by a ticker thread every ``TICK_S``, by each request, and by each
heartbeat, whichever runs first after the process resumes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from tensorcache.errors import Unavailable

TICK_S = 0.1
# Larger than any scheduling delay of a 0.1 s ticker on a loaded host; it
# matters only once the last renewal is older than a lease anyway.
STALL_S = 0.75
DEFAULT_WAIT_S = 5.0


class LeaseGuard:
    """Whether this node may serve now (see the module doc). Thread-safe."""

    def __init__(
        self,
        ttl_s: float,
        *,
        wait_s: float = DEFAULT_WAIT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._cond = threading.Condition()
        self.ttl_s = ttl_s
        self.wait_s = wait_s
        now = clock()
        self._seen = now  # the last observation of the clock
        self._renewed = now  # start of the last heartbeat the router answered "known"
        self._resumed = 0.0  # when the last stall ended (0: none)
        self._cycle = now  # start of the last heartbeat cycle that finished
        self.stalls = 0

    def observe(self) -> float:
        """Look at the clock; a gap since the last look is a stall. Returns now."""
        now = self._clock()
        if now - self._seen > STALL_S:
            with self._cond:
                if now - self._seen > STALL_S:  # first to notice this one
                    self._resumed = now
                    self.stalls += 1
                self._seen = max(self._seen, now)
        else:
            self._seen = max(self._seen, now)
        return now

    def cycle_started(self) -> float:
        """A heartbeat cycle begins now; pass the result to ``cycle_done``."""
        return self.observe()

    def cycle_done(self, started: float, *, renewed: bool) -> None:
        """The cycle begun at ``started`` finished; ``renewed``: the router knew us."""
        with self._cond:
            self._cycle = max(self._cycle, started)
            if renewed:
                self._renewed = max(self._renewed, started)
            self._cond.notify_all()

    def silent_s(self) -> float:
        """Seconds since the last heartbeat the router answered "known" began."""
        return self._clock() - self._renewed

    def _ok(self, now: float) -> bool:
        return now - self._renewed < self.ttl_s or self._cycle >= self._resumed

    def check(self) -> None:
        """Return when this node may serve; raise ``Unavailable`` if it may not."""
        now = self.observe()
        if self._ok(now):
            return
        deadline = now + self.wait_s
        with self._cond:
            while not self._ok(self._clock()):
                left = deadline - self._clock()
                if left <= 0:
                    raise Unavailable(
                        f"this node was stopped for a while and has not heard from its "
                        f"router since ({self._clock() - self._renewed:.1f}s, lease "
                        f"{self.ttl_s:.1f}s): what it holds may be stale; retry"
                    )
                self._cond.wait(left)

    def run_ticker(self, stop: threading.Event) -> None:
        """Observe the clock every ``TICK_S`` until ``stop`` (a daemon thread's body)."""
        while not stop.wait(TICK_S):
            self.observe()
