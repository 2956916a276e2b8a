"""Membership: who is in the cluster, behind a small interface.

``Membership`` is the seam the etcd-backed implementation plugs into. The
``EmbeddedMembership`` here keeps members in the router's memory: nodes
register, heartbeat, and leave after missing heartbeats for ``ttl_s``.

Epochs increase with every change. The embedded epoch is seeded from the
wall clock in microseconds, so a restarted router continues *above* the
epochs nodes and clients saw before (a reset to 1 would make every request
look stale forever, or every node look behind).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from tensorcache.router.ring import RingMember

log = logging.getLogger("tensorcache.router")


@dataclass(frozen=True, slots=True)
class MembershipView:
    epoch: int
    members: tuple[RingMember, ...]


class Membership(Protocol):
    def register(self, member: RingMember) -> int: ...
    def heartbeat(self, name: str) -> tuple[int, bool]:
        """Renew ``name``'s lease; returns (epoch, known)."""
        ...

    def deregister(self, name: str) -> int: ...
    def view(self) -> MembershipView: ...
    def close(self) -> None: ...


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
        self._epoch = time.time_ns() // 1000
        self._view = MembershipView(self._epoch, ())
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
        self._view = MembershipView(self._epoch, members)

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

    def view(self) -> MembershipView:
        with self._lock:
            self._expire_locked()
            return self._view

    def _sweep_loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.view()

    def close(self) -> None:
        self._stop.set()
        if self._sweeper is not None:
            self._sweeper.join(timeout=5)
