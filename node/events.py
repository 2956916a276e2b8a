"""Key events for watch-mode near-caches: what this node committed or deleted.

Every tensor commit (version) and delete (version 0) is queued; one thread
sends what accumulated to the router (``Router.Publish``) every few
milliseconds, and the router fans the events out to watchers. The queue is
bounded: when the router is slow or away, the oldest events are dropped (and
counted, and logged): a watcher that misses events is told to reset by the
router, not by us. A router that does not know Publish (UNIMPLEMENTED) turns
publishing off quietly for a while (nobody can be watching it).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Protocol

import grpc

from tensorcache.authgrpc import NO_CREDENTIALS, Credentials
from tensorcache.grpcutil import CHANNEL_OPTIONS
from tensorcache.proto import tensorcache_pb2 as pb
from tensorcache.proto import tensorcache_pb2_grpc as pb_grpc

log = logging.getLogger("tensorcache.node")

# Wait after the first event of a burst before sending. Measured with
# bench/staleness.py: 5 ms gave a 6 ms median push delay; sending at once
# lets batches form by themselves while a Publish call is in flight.
FLUSH_INTERVAL_S = 0.0
# At most one Publish per this many seconds while events keep coming (the
# first event after a quiet spell still goes at once). Why: one writer's
# back-to-back 4 KiB puts otherwise cost one Publish each, and a Publish is
# the most expensive thing a small put does: measured (bench/smallops.py,
# /proc CPU per thread) ~120 us of node CPU (its publisher thread, holding
# the GIL the data path needs) plus ~160 us in the router, against ~140 us
# for the put itself on the node. With the gap the publish cost is bounded
# (~280 us of CPU per MIN_GAP_S per node, whatever the put rate), and a
# watch-mode copy can outlive a put in a burst by at most this much longer.
MIN_GAP_S = 0.002
MAX_QUEUED = 100_000
MAX_BATCH = 10_000
PUBLISH_TIMEOUT_S = 2.0
# An empty Publish at least this often: the router's watchers are told the
# stream is complete only while it hears from every node (router/events.py).
KEEPALIVE_S = 1.0
UNIMPLEMENTED_RETRY_S = 30.0  # ask a router without Publish again after this
LOG_EVERY_S = 10.0  # at most one warning per this many seconds per cause


class EventSink(Protocol):
    def publish(self, key: str, version: int) -> None: ...
    def close(self) -> None: ...


class NoEvents:
    """A node without a router publishes nothing."""

    def publish(self, key: str, version: int) -> None:
        return None

    def close(self) -> None:
        return None


class EventPublisher:
    def __init__(
        self,
        router: str,
        node: str,
        *,
        interval_s: float = FLUSH_INTERVAL_S,
        min_gap_s: float = MIN_GAP_S,
        max_queued: int = MAX_QUEUED,
        creds: Credentials = NO_CREDENTIALS,
    ) -> None:
        if max_queued < 1:
            raise ValueError(f"max_queued must be >= 1, got {max_queued}")
        if min_gap_s < 0:
            raise ValueError(f"min_gap_s must be >= 0, got {min_gap_s}")
        self._node = node
        self._max_queued = max_queued
        self._router = router
        self._interval_s = interval_s
        self._min_gap_s = min_gap_s
        self._last_try = 0.0  # when the last Publish with events started (monotonic)
        # (key, version): the message is built by the publisher thread, off
        # the commit's path (a KeyEvent per commit was ~1-2 us of it; #18).
        self._queue: deque[tuple[str, int]] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._channel = creds.channel(router, CHANNEL_OPTIONS)
        self._stub = pb_grpc.RouterStub(self._channel)
        self._off_until = 0.0
        self._logged: dict[str, float] = {}
        self.published = 0
        self.calls = 0  # Publish calls with events (keepalives not counted)
        self.dropped = 0
        self._lost = False  # events dropped since the last successful publish
        self._last_sent = 0.0
        self._thread = threading.Thread(target=self._loop, name="key-events", daemon=True)
        self._thread.start()

    def publish(self, key: str, version: int) -> None:
        with self._lock:
            if len(self._queue) >= self._max_queued:
                self._queue.popleft()
                self.dropped += 1
                self._lost = True
                self._warn("overflow", "key event queue full: dropping the oldest events")
            self._queue.append((key, version))
        self._wake.set()

    def _warn(self, cause: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._logged.get(cause, -LOG_EVERY_S) >= LOG_EVERY_S:
            self._logged[cause] = now
            log.warning(msg, *args)

    def _take(self) -> list[pb.KeyEvent]:
        with self._lock:
            n = min(len(self._queue), MAX_BATCH)
            taken = [self._queue.popleft() for _ in range(n)]
        return [pb.KeyEvent(key=key.encode(), version=version) for key, version in taken]

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(KEEPALIVE_S / 2)
            self._wake.clear()
            if self._interval_s and self._stop.wait(self._interval_s):  # gather a burst
                break
            sent = False
            while True:
                # A burst: the previous Publish went out less than min_gap_s
                # ago. Let this one gather what comes meanwhile (bounded delay).
                gap = self._last_try + self._min_gap_s - time.monotonic()
                if gap > 0 and self._queue and self._stop.wait(gap):
                    break
                batch = self._take()
                if not batch:
                    break
                self._last_try = time.monotonic()
                self._send(batch)
                sent = True
            if not sent and time.monotonic() - self._last_sent >= KEEPALIVE_S:
                self._send([])  # keepalive

    def _send(self, batch: list[pb.KeyEvent]) -> None:
        if time.monotonic() < self._off_until:
            return  # the router has no Publish: nobody is watching
        lost = self._lost
        self._lost = False
        try:
            self._stub.Publish(
                pb.PublishRequest(node=self._node, events=batch, lost=lost),
                timeout=PUBLISH_TIMEOUT_S,
            )
            self.published += len(batch)
            self.calls += 1 if batch else 0
            self._last_sent = time.monotonic()
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            if code == grpc.StatusCode.UNIMPLEMENTED:
                self._off_until = time.monotonic() + UNIMPLEMENTED_RETRY_S
                return
            self.dropped += len(batch)
            self._lost = True  # the router resets its watchers when we are back
            self._warn("router", "publishing key events to %s failed: %s", self._router, code)
        except Exception:  # never let the thread die silently
            self.dropped += len(batch)
            self._lost = True
            log.exception("publishing key events failed")

    def close(self) -> None:
        """Flush what is queued (bounded by one publish timeout), then stop."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=PUBLISH_TIMEOUT_S + 1)
        batch = self._take()
        if batch:
            self._send(batch)
        self._channel.close()
        log.info("key events: %d published in %d calls", self.published, self.calls)
