"""Pacing: background work yields to the data path, by a bounded amount.

A ring change makes every node scan what it holds and push copies to new
owners (node/rebalance.py). That work is pure Python: while it runs, a
get's thread waits for the interpreter (up to the 5 ms switch interval at
every hand-over, several per request) and, on a small machine, for a core.
Measured with ``bench.jointail`` (docs/performance.md), the scan and its
pushes are what a get waits behind during a join.

So the data path says when it is busy (``Activity``: requests in flight,
and when the last one ended), and the scan, after each chunk, asks the
``Pacer`` for a pause in proportion to the work it just did: with
``share`` = 0.5 it runs at most half of the wall time while gets or puts
are being served, and at full speed once the data path has been quiet for
``idle_s``. The slowdown is bounded by construction: a scan takes at most
``1 / share`` times as long as unpaced (plus ``max_pause_s`` per chunk, a
cap that matters only for a chunk slowed by something else), however busy
the node is, so a join always finishes. A SIGTERM drain is not paced: it
runs against its deadline, and what it has not handed over when that runs
out leaves with the process.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class PaceConfig:
    """How background work yields; the defaults are what docs/performance.md measured."""

    #: Fraction of wall time background work may use while the data path is busy
    #: (1.0: never pause). The scan is then at most ``1 / share`` times slower.
    share: float = 0.5
    #: Longest single pause (a chunk that took long for other reasons, e.g.
    #: a push waiting on a slow peer, must not stall the scan for as long).
    max_pause_s: float = 0.05
    #: The data path counts as busy this long after its last request ended.
    idle_s: float = 0.05

    def __post_init__(self) -> None:
        if not 0.05 <= self.share <= 1.0:
            raise ValueError(f"share must be in [0.05, 1], got {self.share}")
        if not 0.0 <= self.max_pause_s <= 1.0:
            raise ValueError(f"max_pause_s must be in [0, 1] s, got {self.max_pause_s}")
        if not 0.0 <= self.idle_s <= 10.0:
            raise ValueError(f"idle_s must be in [0, 10] s, got {self.idle_s}")


class Activity:
    """The data path's requests in flight, and when the last one ended.

    ``busy`` is read by background threads between chunks of work; the
    counter costs a lock per request (well under a microsecond).
    """

    def __init__(
        self, idle_s: float = PaceConfig.idle_s, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._idle_s = idle_s
        self._clock = clock
        self._lock = threading.Lock()
        self._in_flight = 0
        self._last = float("-inf")

    def begin(self) -> None:
        with self._lock:
            self._in_flight += 1

    def end(self) -> None:
        with self._lock:
            self._in_flight -= 1
            self._last = self._clock()

    def touch(self) -> None:
        """A request that is not tracked in flight (a put's commit) just happened."""
        self._last = self._clock()

    def busy(self) -> bool:
        """Whether a request is in flight or ended less than ``idle_s`` ago."""
        return self._in_flight > 0 or self._clock() - self._last < self._idle_s


class Pacer:
    """Turns "this chunk took ``worked_s``" into a pause while the data path is busy."""

    def __init__(
        self,
        busy: Callable[[], bool],
        config: PaceConfig | None = None,
        *,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._busy = busy
        self._config = config if config is not None else PaceConfig()
        self._sleep = sleep
        self._ratio = (1.0 - self._config.share) / self._config.share
        #: Seconds paused so far (reported in the rebalance log line).
        self.paused_s = 0.0

    def after(self, worked_s: float) -> float:
        """Pause after ``worked_s`` of background work; returns the pause taken.

        Always yields the interpreter at least (``sleep(0)``), so a waiting
        request thread gets it at once rather than after a switch interval.
        """
        pause = 0.0
        if self._ratio > 0 and self._busy():
            pause = min(worked_s * self._ratio, self._config.max_pause_s)
        self._sleep(pause)
        self.paused_s += pause
        return pause
