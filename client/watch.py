"""Watch mode for the near-cache: the router's event stream, consumed on a thread.

``Router.Watch`` streams ``WatchEvent``s: key events (a put committed or a
delete, published by nodes), namespace invalidations, a ``reset`` when the
router dropped events for us (and as the first message), and an epoch-only
keepalive at least every second. This module applies them to a
``NearCache`` and says whether the stream is *live*: a message arrived
within ``live_s``. Only a live stream lets the near-cache serve a hit
without asking the owner; otherwise the client falls back to strict
revalidation, so a dead router or a broken stream costs speed, never
correctness. On every (re)connect the near-cache is cleared first: events
missed while disconnected cannot be replayed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc

from tensorcache.client.nearcache import NearCache
from tensorcache.client.transport import RouterConn
from tensorcache.proto import tensorcache_pb2 as pb

log = logging.getLogger("tensorcache.client")

# A keepalive comes at least every second; three missed ones mean the stream is gone.
LIVE_S = 3.0
_MAX_BACKOFF_S = 2.0


class EventWatcher:
    def __init__(
        self,
        router: RouterConn,
        near: NearCache,
        *,
        live_s: float = LIVE_S,
        listener: Callable[[pb.WatchEvent, int], None] | None = None,
    ) -> None:
        self._router = router
        self._near = near
        self._live_s = live_s
        self._listener = listener  # (event, arrival monotonic_ns): for measurements
        self._last = 0.0  # monotonic time of the last message; 0: not connected
        self._complete = False  # the last message's WatchEvent.complete
        self._stop = threading.Event()
        self._call: grpc.Future[Any] | None = None
        self._lock = threading.Lock()
        self.events = 0
        self.resets = 0
        self.reconnects = 0
        self._thread = threading.Thread(target=self._loop, name="tensorcache-watch", daemon=True)
        self._thread.start()

    @property
    def live(self) -> bool:
        """A message arrived lately and the router hears from every node."""
        last = self._last
        return self._complete and last > 0 and time.monotonic() - last < self._live_s

    @property
    def connected(self) -> bool:
        """A message arrived on the current stream (it may still say incomplete)."""
        return self._last > 0

    @property
    def complete(self) -> bool:
        """The last message said every node's events reach this stream."""
        return self._complete

    def wait_live(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.live:
            if time.monotonic() > deadline or self._stop.is_set():
                return False
            time.sleep(0.01)
        return True

    def _loop(self) -> None:
        backoff = 0.05
        while not self._stop.is_set():
            try:
                stream = self._router.stub.Watch(pb.WatchRequest())
                with self._lock:
                    self._call = stream
                if self._stop.is_set():
                    stream.cancel()
                    return
                for event in stream:
                    self._apply(event)
                    backoff = 0.05
            except grpc.RpcError as exc:
                if self._stop.is_set():
                    return
                code = exc.code() if hasattr(exc, "code") else exc
                log.info("router event stream broke (%s); strict mode until it is back", code)
            self._last = 0.0
            self._near.clear()
            self.reconnects += 1
            self._stop.wait(backoff)
            backoff = min(backoff * 2, _MAX_BACKOFF_S)

    def _apply(self, event: pb.WatchEvent) -> None:
        arrived = time.monotonic_ns()
        if event.reset:
            self.resets += 1
            self._near.clear()
        for inv in event.invalidations:
            self._near.drop_prefix(inv.prefix)
        for ke in event.keys:
            self._near.key_event(ke.key.decode("utf-8", "replace"), ke.version)
        self.events += len(event.keys)
        self._complete = event.complete
        self._last = time.monotonic()
        if self._listener is not None:
            self._listener(event, arrived)

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            if self._call is not None:
                self._call.cancel()
        self._thread.join(timeout=5)
