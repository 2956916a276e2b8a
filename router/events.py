"""The key-event hub behind Router.Publish and Router.Watch.

Watch-mode near-caches serve hits without asking a node, so they must hear
of every change: nodes publish the keys they commit or delete, the router
learns of namespace invalidations from its own view, and this hub fans both
out to every watcher. Plain threading, no gRPC: the servicer adapts.

Each watcher has its own bounded queue. A watcher that falls behind does
not slow the others or grow without bound: when its queue would pass
``max_queue`` items, the queue is dropped and the watcher's next batch says
``reset`` (forget everything cached; the servicer re-sends the epoch and
the whole invalidation table). A batch with nothing in it is a keepalive:
``next_batch`` returns one after ``keepalive_s`` of quiet, so a client can
tell a quiet stream from a dead one. Closing the hub ends every watcher's
stream (``next_batch`` returns None).

Items are ``(key: bytes, version: int)`` for key events (version 0: deleted)
and ``(prefix: str, epoch: int)`` for invalidations; they keep their order in
a queue, and a batch splits them by type.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from tensorcache.errors import CapacityExceeded, Unavailable

KeyEvent = tuple[bytes, int]
Invalidation = tuple[str, int]

DEFAULT_MAX_QUEUE = 65536
DEFAULT_MAX_WATCHERS = 128
DEFAULT_COALESCE_S = 0.0005
DEFAULT_KEEPALIVE_S = 0.5
DEFAULT_MAX_BATCH = 4096
# A ring member not heard from (Publish or keepalive) for this long makes the
# router's event stream incomplete; nodes keep alive every second.
SILENCE_S = 3.0


@dataclass(frozen=True, slots=True)
class Batch:
    keys: tuple[KeyEvent, ...] = ()
    invalidations: tuple[Invalidation, ...] = ()
    #: Events were dropped (or the stream starts): forget everything cached.
    reset: bool = False


class Watcher:
    """One watcher's queue; filled by the hub, drained by one stream."""

    def __init__(self, max_queue: int) -> None:
        self._max_queue = max_queue
        self._queue: deque[KeyEvent | Invalidation] = deque()
        self._cond = threading.Condition()
        self._overflowed = False
        self._woken = False  # the epoch moved: send a message even if empty
        self._closed = False
        #: Times this watcher's queue overflowed and was dropped.
        self.resets = 0

    def push(self, items: list[KeyEvent | Invalidation], *, wake: bool = False) -> None:
        with self._cond:
            if self._closed:
                return
            if not self._overflowed:
                if len(self._queue) + len(items) > self._max_queue:
                    self._queue.clear()
                    self._overflowed = True
                    self.resets += 1
                else:
                    self._queue.extend(items)
            self._woken = self._woken or wake
            self._cond.notify_all()

    def reset(self) -> None:
        """Drop what is queued; the next batch says ``reset``."""
        with self._cond:
            self._queue.clear()
            self._overflowed = True
            self._cond.notify_all()

    def _ready(self) -> bool:
        return self._closed or self._overflowed or self._woken or bool(self._queue)

    def next_batch(
        self,
        keepalive_s: float = DEFAULT_KEEPALIVE_S,
        *,
        coalesce_s: float = DEFAULT_COALESCE_S,
        max_batch: int = DEFAULT_MAX_BATCH,
    ) -> Batch | None:
        """The next message's worth: events, a reset, or an empty keepalive.

        Waits up to ``keepalive_s`` for something; once something came, waits
        ``coalesce_s`` more so a burst goes out as one message of at most
        ``max_batch`` items. None: the watcher was closed.
        """
        with self._cond:
            if not self._cond.wait_for(self._ready, keepalive_s):
                return Batch()
            if coalesce_s > 0 and not (self._closed or self._overflowed):
                self._cond.wait_for(lambda: self._closed, coalesce_s)
            if self._closed:
                return None
            self._woken = False
            if self._overflowed:
                self._overflowed = False
                return Batch(reset=True)
            keys: list[KeyEvent] = []
            invalidations: list[Invalidation] = []
            for _ in range(min(max_batch, len(self._queue))):
                item = self._queue.popleft()
                if isinstance(item[0], bytes):
                    keys.append(item)
                else:
                    invalidations.append(item)
            return Batch(tuple(keys), tuple(invalidations))

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._queue.clear()
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def queued(self) -> int:
        """Events waiting in this watcher's queue (its lag behind the hub)."""
        return len(self._queue)


class EventHub:
    """Fans key events and invalidations out to every watcher."""

    def __init__(
        self, *, max_queue: int = DEFAULT_MAX_QUEUE, max_watchers: int = DEFAULT_MAX_WATCHERS
    ) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        if max_watchers < 0:
            raise ValueError(f"max_watchers must be >= 0, got {max_watchers}")
        self.max_queue = max_queue
        self.max_watchers = max_watchers
        self._watchers: set[Watcher] = set()
        self._lock = threading.Lock()
        self._closed = False
        #: Key events accepted from nodes.
        self.published = 0
        self._heard: dict[str, float] = {}  # node -> monotonic time of its last Publish
        self._asked: dict[str, float] = {}  # node -> when ``complete`` first asked for it
        self._started = time.monotonic()

    def subscribe(self) -> Watcher:
        with self._lock:
            if self._closed:
                raise Unavailable("the router is shutting down")
            if len(self._watchers) >= self.max_watchers:
                raise CapacityExceeded(
                    f"this router serves at most {self.max_watchers} watchers; "
                    "use strict near-caches or another router"
                )
            watcher = Watcher(self.max_queue)
            self._watchers.add(watcher)
            return watcher

    def unsubscribe(self, watcher: Watcher) -> None:
        watcher.close()
        with self._lock:
            self._watchers.discard(watcher)

    def __len__(self) -> int:
        with self._lock:
            return len(self._watchers)

    def lag(self) -> int:
        """The longest queue of any watcher: how far the slowest one is behind."""
        with self._lock:
            watchers = list(self._watchers)
        return max((w.queued for w in watchers), default=0)

    def _fan_out(self, items: list[KeyEvent | Invalidation], wake: bool) -> None:
        with self._lock:
            watchers = list(self._watchers)
            if not wake:
                self.published += len(items)
        for watcher in watchers:
            watcher.push(items, wake=wake)

    def publish(self, events: Iterable[KeyEvent], *, node: str = "", lost: bool = False) -> None:
        """Key events from ``node``, in the order it committed them (none: a keepalive).

        ``lost``: the node dropped events since its last publish; every
        watcher is reset, since nobody can tell which keys they were.
        """
        if node:
            with self._lock:
                self._heard[node] = time.monotonic()
        items: list[KeyEvent | Invalidation] = list(events)
        if items:
            self._fan_out(items, wake=False)
        if lost:
            self.reset_all()

    def reset_all(self) -> None:
        with self._lock:
            watchers = list(self._watchers)
        for watcher in watchers:
            watcher.reset()

    def complete(self, nodes: Iterable[str], silence_s: float = SILENCE_S) -> bool:
        """Whether every one of ``nodes`` published within ``silence_s``.

        A node first asked about less than ``silence_s`` ago gets that long to
        be heard (it just joined the ring), but only on a router that has run
        that long itself: a router that just started has heard nobody yet and
        must not claim it misses nothing (its peers may not relay to it yet).
        """
        now = time.monotonic()
        young = now - self._started < silence_s
        with self._lock:
            for node in nodes:
                heard = self._heard.get(node)
                if heard is not None and now - heard < silence_s:
                    continue
                asked = self._asked.setdefault(node, now)
                if young or now - asked >= silence_s:
                    return False
        return True

    def epoch_changed(self, new_invalidations: Iterable[Invalidation] = ()) -> None:
        """The router's view moved on; every watcher gets a message (with these records)."""
        self._fan_out(list(new_invalidations), wake=True)

    def close(self) -> None:
        """End every stream: each watcher's ``next_batch`` returns None."""
        with self._lock:
            self._closed = True
            watchers = list(self._watchers)
            self._watchers.clear()
        for watcher in watchers:
            watcher.close()
