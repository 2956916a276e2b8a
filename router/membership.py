"""Membership: who is in the cluster, behind a small interface.

``Membership`` is the seam the etcd-backed implementation plugs into. The
``EmbeddedMembership`` here keeps members in the router's memory: nodes
register, heartbeat, and leave after missing heartbeats for ``ttl_s``.

A view is one ring epoch: the members *and* the namespace invalidations in
force at that epoch (``invalidate(prefix)`` records ``(prefix, E)`` as part
of a new epoch E; docs/consistency.md). Epochs increase with every change of
either. The embedded epoch is seeded from the wall clock in microseconds, so
a restarted router continues *above* the epochs nodes and clients saw
before (a reset to 1 would make every request look stale forever, or every
node look behind). Its invalidations live in memory and die with it: a
restarted embedded router has an empty table, and every value stamped
before the restart carries a smaller epoch than anything it will record, so
forgetting old records loses nothing that a new invalidation needs.

A view also carries the placements just before it (``earlier``): the member
lists of the last few epochs whose members differ, each with when it ended.
A node that joins, or that skipped epochs between two of its ring fetches,
learns from them who held keys before it was told (node/rings.py): a
handoff then follows the whole chain of holders, not only the rings that
node happened to see (issue #8: a key still on its owner of two rings ago,
not yet pushed on, was a miss at a joiner that knew only the last ring).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

from tensorcache.ring import RingMember

log = logging.getLogger("tensorcache.router")


# Placements a view remembers before its own: enough for a few joins in a
# row (a StatefulSet scaling up), small enough for every node's ring fetch.
EARLIER_PLACEMENTS = 8


@dataclass(frozen=True, slots=True)
class PastPlacement:
    """The members of an earlier epoch, and when (``time.monotonic``) it ended."""

    epoch: int
    members: tuple[RingMember, ...]
    ended: float


@dataclass(frozen=True, slots=True)
class MembershipView:
    epoch: int
    members: tuple[RingMember, ...]
    #: (prefix, epoch) of every namespace invalidation in force, by prefix.
    invalidations: tuple[tuple[str, int], ...] = ()
    #: The placements before this one, newest first (filled by ``ViewCell``).
    earlier: tuple[PastPlacement, ...] = ()

    def invalidation_table(self) -> dict[str, int]:
        return dict(self.invalidations)


@dataclass(frozen=True, slots=True)
class MembershipStatus:
    """Health of the membership store, for Router.Status and grpc health."""

    state: Literal["ok", "degraded"]
    detail: str = ""  # why degraded ("" when ok)
    where: str = field(default="embedded")  # "embedded" or the etcd URL


class Membership(Protocol):
    def register(self, member: RingMember) -> int: ...
    def heartbeat(self, name: str) -> tuple[int, bool]:
        """Renew ``name``'s lease; returns (epoch, known)."""
        ...

    def deregister(self, name: str) -> int: ...
    def invalidate(self, prefix: str) -> int:
        """Record a namespace invalidation; returns its epoch once this router's view has it."""
        ...

    def view(self) -> MembershipView:
        """The current view; never does I/O."""
        ...

    def wait_view(self, newer_than: int, timeout: float) -> MembershipView:
        """The view once its epoch exceeds ``newer_than``, or the current one after ``timeout``."""
        ...

    def status(self) -> MembershipStatus: ...
    def close(self) -> None: ...


class ViewCell:
    """The one published view, and a condition to wait for a newer one.

    It also remembers the last ``EARLIER_PLACEMENTS`` placements (member
    lists) that a newer one replaced, and hands them out with each view.
    """

    def __init__(
        self, view: MembershipView, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._view = view
        self._cond = threading.Condition()
        self._clock = clock
        self._earlier: deque[PastPlacement] = deque(maxlen=EARLIER_PLACEMENTS)

    def get(self) -> MembershipView:
        return self._view

    def set(self, view: MembershipView) -> None:
        with self._cond:
            old = self._view
            if old.members and old.members != view.members and view.epoch > old.epoch:
                self._earlier.appendleft(PastPlacement(old.epoch, old.members, self._clock()))
            self._view = dataclasses.replace(view, earlier=tuple(self._earlier))
            self._cond.notify_all()

    def wait(self, newer_than: int, timeout: float) -> MembershipView:
        with self._cond:
            self._cond.wait_for(lambda: self._view.epoch > newer_than, timeout)
            return self._view


@dataclass(slots=True)
class _Lease:
    member: RingMember
    expires: float


class EmbeddedMembership:
    """In-process membership with heartbeat leases (no external dependency)."""

    def __init__(
        self,
        ttl_s: float = 3.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        sweep_interval_s: float | None = None,
    ) -> None:
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        self.ttl_s = ttl_s
        self._clock = clock
        self._leases: dict[str, _Lease] = {}
        self._invalidations: dict[str, int] = {}
        self._epoch = time.time_ns() // 1000
        self._cell = ViewCell(MembershipView(self._epoch, ()))
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sweeper: threading.Thread | None = None
        if sweep_interval_s is not None:
            self._sweeper = threading.Thread(
                target=self._sweep_loop,
                args=(sweep_interval_s,),
                name="membership-sweep",
                daemon=True,
            )
            self._sweeper.start()

    def _changed_locked(self) -> None:
        self._epoch += 1
        members = tuple(
            sorted((lease.member for lease in self._leases.values()), key=lambda m: m.name)
        )
        self._cell.set(
            MembershipView(self._epoch, members, tuple(sorted(self._invalidations.items())))
        )

    def _expire_locked(self) -> None:
        now = self._clock()
        dead = [name for name, lease in self._leases.items() if lease.expires <= now]
        for name in dead:
            del self._leases[name]
            log.warning(
                "node %s missed heartbeats for %.1fs: removed from the ring", name, self.ttl_s
            )
        if dead:
            self._changed_locked()

    def register(self, member: RingMember) -> int:
        with self._lock:
            self._expire_locked()
            old = self._leases.get(member.name)
            self._leases[member.name] = _Lease(member, self._clock() + self.ttl_s)
            if old is None or old.member != member:
                log.info(
                    "node %s joined at %s (%d bytes)", member.name, member.address, member.capacity
                )
                self._changed_locked()
            return self._epoch

    def heartbeat(self, name: str) -> tuple[int, bool]:
        with self._lock:
            self._expire_locked()
            lease = self._leases.get(name)
            if lease is None:
                return self._epoch, False
            lease.expires = self._clock() + self.ttl_s
            return self._epoch, True

    def deregister(self, name: str) -> int:
        with self._lock:
            if self._leases.pop(name, None) is not None:
                log.info("node %s left", name)
                self._changed_locked()
            return self._epoch

    def invalidate(self, prefix: str) -> int:
        with self._lock:
            self._expire_locked()
            # The record carries the epoch it creates: the next one.
            self._invalidations[prefix] = self._epoch + 1
            self._changed_locked()
            log.info("invalidated prefix %r at epoch %d", prefix, self._epoch)
            return self._epoch

    def view(self) -> MembershipView:
        with self._lock:
            self._expire_locked()
            return self._cell.get()

    def wait_view(self, newer_than: int, timeout: float) -> MembershipView:
        self.view()  # expire first: a lapsed lease is a change worth waking for
        return self._cell.wait(newer_than, timeout)

    def status(self) -> MembershipStatus:
        return MembershipStatus("ok", "", "embedded")

    def _sweep_loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.view()

    def close(self) -> None:
        self._stop.set()
        if self._sweeper is not None:
            self._sweeper.join(timeout=5)
