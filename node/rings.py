"""The node's view of placement: its current ring and the one before it.

A node needs two rings. The current one says which keys it owns (the others
it demotes) and which namespace invalidations are in force. The previous one
says who held a key before the last membership change, so a miss can be
answered by a warm handoff from there (docs/consistency.md, "Warm
rebalance"). Both are immutable snapshots; a change swaps one reference to a
``Rings`` pair, so a reader takes the pair once and sees a consistent view.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from tensorcache.node.store import Entry
from tensorcache.router.ring import Ring, RingMember, invalidated_before

# How long after a ring change a miss asks the previous owners. Long enough
# for clients to warm the new owners by reading (a model's weights are read
# within seconds of a rollout); short enough that the bookkeeping of keys
# written or deleted meanwhile (which must not be overwritten by a handoff)
# stays small.
HANDOFF_WINDOW_S = 120.0
TENSOR = 0


def _incarnations(members: tuple[RingMember, ...]) -> set[tuple[str, str]]:
    """Members as (name, address): a node restarted under its name is a new one (empty)."""
    return {(m.name, m.address) for m in members}


def _same_placement(a: Ring, b: Ring) -> bool:
    """Whether every key has the same replica set in both rings."""
    return (a.replicas, a.vnodes, a.weight_unit, a.members) == (
        b.replicas,
        b.vnodes,
        b.weight_unit,
        b.members,
    )


@dataclass(frozen=True, slots=True)
class Rings:
    current: Ring | None
    previous: Ring | None
    changed_at: float  # monotonic time the current ring was installed
    # Every invalidation this node has seen (prefix -> newest epoch), not only
    # the current ring's: an embedded router forgets its table when it
    # restarts, and an operator may delete old records from etcd, but an
    # entry hidden once must stay hidden.
    invalidations: Mapping[str, int] = field(default_factory=dict)


class RingView:
    """The rings of node ``name``; installs only ever move forward in epoch."""

    def __init__(
        self,
        name: str,
        *,
        window_s: float = HANDOFF_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if window_s < 0:
            raise ValueError(f"window_s must be >= 0, got {window_s}")
        self.name = name
        self.window_s = window_s
        self._clock = clock
        self._rings = Rings(None, None, 0.0)

    @property
    def rings(self) -> Rings:
        return self._rings

    @property
    def current(self) -> Ring | None:
        return self._rings.current

    def install(self, ring: Ring) -> bool:
        """Make ``ring`` current unless it is not newer; returns whether it was installed.

        Callers serialize installs (the membership agent holds a lock).
        """
        old = self._rings
        if old.current is not None and ring.epoch <= old.current.epoch:
            return False
        merged = dict(old.invalidations)
        for prefix, epoch in ring.invalidations.items():
            if epoch > merged.get(prefix, 0):
                merged[prefix] = epoch
        if old.current is not None and _same_placement(old.current, ring):
            # Only the invalidation table changed: nothing moved, so the
            # previous ring (and its handoff window) stays what it was.
            self._rings = Rings(ring, old.previous, old.changed_at, merged)
        else:
            self._rings = Rings(ring, old.current, self._clock(), merged)
        return True

    def member(self) -> bool:
        """Whether this node is in its current ring (False before it knows one)."""
        ring = self._rings.current
        return ring is not None and self.name in ring

    def owns(self, key: str, ring: Ring | None = None) -> bool:
        """Whether this node is in ``key``'s replica set (of ``ring``, default current).

        A node outside its ring (standalone, joining, leaving) owns everything
        it holds: it has no better place to send a key.
        """
        ring = ring if ring is not None else self._rings.current
        if ring is None or self.name not in ring:
            return True
        return any(m.name == self.name for m in ring.replica_set(key))

    def stale(self, entry: Entry) -> bool:
        """Namespace invalidation: a tensor committed before an invalidation of its prefix."""
        return entry.key[0] == TENSOR and self.invalidated(entry.key[1], entry.stamp)

    def invalidated(self, key: str, stamp: int) -> bool:
        table = self._rings.invalidations
        return bool(table) and invalidated_before(table, key) > stamp

    def in_window(self) -> bool:
        rings = self._rings
        return rings.previous is not None and self._clock() - rings.changed_at < self.window_s

    def previous_owners(self, key: str) -> list[RingMember]:
        """Who held ``key`` before the last change, if a miss here should ask them.

        Non-empty only within the handoff window, when this node is in the
        key's current replica set, and for the members of the previous replica
        set other than this node.
        """
        rings = self._rings
        if rings.previous is None or rings.current is None or not rings.previous.members:
            return []
        if self._clock() - rings.changed_at >= self.window_s:
            return []
        if self.name not in rings.current or not self.owns(key, rings.current):
            return []
        before = rings.previous.replica_set(key)
        if _incarnations(before) == _incarnations(rings.current.replica_set(key)):
            return []  # the key's replicas did not change: every one got every write
        return [m for m in before if m.name != self.name]

    def peers(self) -> list[RingMember]:
        """Every other member of the current and previous rings (fencing targets)."""
        rings = self._rings
        seen: dict[str, RingMember] = {}
        for ring in (rings.current, rings.previous):
            if ring is None:
                continue
            for m in ring.members:
                if m.name != self.name and m.name not in seen:
                    seen[m.name] = m
        return list(seen.values())
