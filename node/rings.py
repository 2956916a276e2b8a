"""The node's view of placement: its current ring and the placements before it.

A node needs more than its current ring. The current one says which keys it
owns and which namespace invalidations are in force. The rings before it say
who held a key before the last membership changes, so a miss can be answered
by a warm handoff from there (docs/consistency.md, "Warm rebalance"), and
whether an entry held here was owned elsewhere meanwhile (then it may be
stale: ``placement``). Several changes can follow each other faster than
entries move (a StatefulSet starting pods one by one, a rolling restart), so
the view keeps a *history* of placements, not one previous ring: a key put
at epoch 4 and read at epoch 8 is found wherever epoch 4 put it.

Rings are immutable snapshots; a change swaps one reference to a ``Rings``
record, so a reader takes it once and sees a consistent view. Installing a
ring is O(1): nothing here walks the store (node/rebalance.py does, on its
own thread).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from tensorcache.node.store import Entry
from tensorcache.ring import Ring, RingMember, invalidated_before

# How long after a ring change a miss asks the previous owners. Long enough
# for clients to warm the new owners by reading (a model's weights are read
# within seconds of a rollout) and for re-replication to finish; short enough
# that the bookkeeping of keys written or deleted meanwhile (which must not
# be overwritten by a handoff) stays small.
HANDOFF_WINDOW_S = 120.0
# Placements remembered. Each is one immutable Ring (a few hundred KiB at
# most); an entry not re-checked for this many changes is judged by the
# oldest one kept.
MAX_HISTORY = 64
# Previous owners a miss asks at most (newest placements first).
MAX_PREVIOUS_OWNERS = 8
TENSOR = 0


class Placement(enum.StrEnum):
    """What a node does with an entry after placement changes (``RingView.placement``)."""

    KEEP = "keep"  # owned now and throughout, by the same replica set: serve it
    #: Owned now and throughout, but the key's replica set changed meanwhile:
    #: serve it, and forget who else was assumed to hold it (a client's copy
    #: to a replica may have been refused and sent elsewhere), so the scan
    #: makes sure each current replica has it.
    KEEP_RESET = "keep-reset"
    DEMOTE = "demote"  # owned elsewhere now: hold it for handoffs and push it there
    DISCARD = "discard"  # owned again after being elsewhere: maybe stale, drop it


def _incarnations(members: tuple[RingMember, ...]) -> set[tuple[str, str, int]]:
    """Members as processes: a node restarted under its name is a new one (empty)."""
    return {m.incarnation_key for m in members}


def same_placement(a: Ring, b: Ring) -> bool:
    """Whether every key has the same replica set in both rings."""
    return (a.replicas, a.vnodes, a.weight_unit, a.members) == (
        b.replicas,
        b.vnodes,
        b.weight_unit,
        b.members,
    )


#: Placements before a ring, newest first: (placement, seconds since it ended).
Earlier = Sequence[tuple[Ring, float]]


def _missed(
    earlier: Earlier, last: int, epoch: int, now: float
) -> tuple[tuple[Ring, ...], tuple[float, ...]]:
    """The placements of ``earlier`` between epochs ``last`` and ``epoch``, oldest
    first, each with the (monotonic) time it became current: when the one
    before it ended, or its own end for the oldest the router remembers."""
    known = [(r, now - ago) for r, ago in earlier if r.members]
    rings: list[Ring] = []
    starts: list[float] = []
    for i, (r, _ended) in enumerate(known):
        if last < r.epoch < epoch:
            rings.append(r)
            starts.append(known[i + 1][1] if i + 1 < len(known) else known[i][1])
    return tuple(reversed(rings)), tuple(reversed(starts))


@dataclass(frozen=True, slots=True)
class Rings:
    current: Ring | None
    #: Rings at which placement changed, oldest first; the last has the
    #: current placement (the current ring may be newer: an invalidation).
    history: tuple[Ring, ...] = ()
    #: Monotonic time each ring of ``history`` was installed.
    installed_at: tuple[float, ...] = ()
    # Every invalidation this node has seen (prefix -> newest epoch), not only
    # the current ring's: an embedded router forgets its table when it
    # restarts, and an operator may delete old records from etcd, but an
    # entry hidden once must stay hidden.
    invalidations: Mapping[str, int] = field(default_factory=dict)

    @property
    def previous(self) -> Ring | None:
        """The placement before the current one."""
        return self.history[-2] if len(self.history) >= 2 else None

    @property
    def changed_at(self) -> float:
        """Monotonic time the current placement was installed (0.0: none)."""
        return self.installed_at[-1] if self.installed_at else 0.0

    @property
    def placement_epoch(self) -> int:
        """Epoch of the ring that brought the current placement (0: none)."""
        return self.history[-1].epoch if self.history else 0


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
        self._rings = Rings(None)
        # Entries judged at or before this epoch are suspect: the node was out
        # of the ring for a while without seeing it (paused, partitioned) and
        # the placements in between are unknown (``mark_gap``).
        self._gap = 0
        self._force = False

    @property
    def rings(self) -> Rings:
        return self._rings

    @property
    def current(self) -> Ring | None:
        return self._rings.current

    def install(self, ring: Ring, earlier: Earlier = ()) -> bool:
        """Make ``ring`` current unless it is not newer; returns whether it was installed.

        ``earlier``: the placements the router had before ``ring``, newest
        first, each with the seconds since it ended (RingSnapshot.earlier).
        Those newer than the last placement this node knows go into its
        history before ``ring``: a joining node, or one that skipped epochs
        between two fetches, then asks every holder of the chain on a miss
        (``previous_owners``), not only the placements it saw itself.

        O(1) in the number of entries (``placement_epoch`` tells whether
        placement changed). Callers serialize installs (the
        membership agent holds a lock).
        """
        old = self._rings
        if old.current is not None and ring.epoch <= old.current.epoch:
            return False
        merged = dict(old.invalidations)
        for prefix, epoch in ring.invalidations.items():
            if epoch > merged.get(prefix, 0):
                merged[prefix] = epoch
        force, self._force = self._force, False
        if old.history and same_placement(old.history[-1], ring) and not force:
            # Only the invalidation table changed: nothing moved, so the
            # placements (and the handoff window) stay what they were.
            self._rings = Rings(ring, old.history, old.installed_at, merged)
            return True
        now = self._clock()
        last = old.history[-1].epoch if old.history else 0
        missed, missed_at = _missed(earlier, last, ring.epoch, now)
        floor = old.installed_at[-1] if old.installed_at else 0.0
        starts = tuple(max(t, floor) for t in missed_at)
        top = missed[-1].epoch if missed else last
        if (
            force
            and self.name in ring
            and ring.epoch - 1 > top
            and all(self.name in r for r in missed)
        ):
            # Back from a gap: the ring went on without us meanwhile (that is
            # what a lease running out does). When the router's placements do
            # not reach back to one without us, stand in for those unseen
            # rings with this one less us, so a miss asks who held our keys then.
            without = Ring(
                ring.epoch - 1,
                [m for m in ring.members if m.name != self.name],
                vnodes=ring.vnodes,
                weight_unit=ring.weight_unit,
                replicas=ring.replicas,
            )
            missed, starts = (*missed, without), (*starts, now)
        added, at = (*missed, ring), (*starts, now)
        history = (*old.history, *added)[-MAX_HISTORY:]
        installed_at = (*old.installed_at, *at)[-MAX_HISTORY:]
        self._rings = Rings(ring, history, installed_at, merged)
        return True

    @property
    def placement_epoch(self) -> int:
        return self._rings.placement_epoch

    def mark_gap(self) -> None:
        """The router forgot this node (its lease expired while it was paused or
        cut off): placements came and went unseen, and keys it holds may have
        been written or deleted elsewhere meanwhile. Every entry judged so far
        becomes suspect (DISCARD when owned), and the next ring installed counts
        as a placement change, so every entry is judged again.
        """
        current = self._rings.current
        self._gap = max(self._gap, current.epoch if current is not None else 0)
        self._force = True

    def placement_at(self, epoch: int) -> Ring | None:
        """The ring whose placement was in force at ``epoch`` (None: not remembered)."""
        for ring in reversed(self._rings.history):
            if ring.epoch <= epoch:
                return ring
        return None

    def placement(self, key: str, checked: int, demoted: bool) -> Placement:
        """Judge an entry of ``key`` last checked at placement epoch ``checked``.

        DEMOTE when this node no longer owns the key; DISCARD when it owns it
        now but did not at some placement since ``checked`` (or the entry was
        demoted): while the key lived elsewhere it may have been written or
        deleted there, and serving this copy could be stale. Rings this node
        is not in count as owning everything (a joining or leaving node has
        no better place for what it holds).
        """
        history = self._rings.history
        if not history or self.name not in history[-1]:
            # No ring yet, or joining/leaving: leave the entry as it is.
            return Placement.DEMOTE if demoted else Placement.KEEP
        if not self.owns(key, history[-1]):
            return Placement.DEMOTE
        if demoted or checked <= self._gap:
            return Placement.DISCARD
        then = self.placement_at(checked)
        before = _incarnations(then.replica_set(key)) if then is not None else None
        changed = before is None
        for ring in reversed(history):
            if ring.epoch <= checked:
                break
            if not self.owns(key, ring):
                return Placement.DISCARD
            if not changed and ring.members and _incarnations(ring.replica_set(key)) != before:
                changed = True
        return Placement.KEEP_RESET if changed else Placement.KEEP

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
        return len(rings.history) >= 2 and self._clock() - rings.changed_at < self.window_s

    def previous_owners(self, key: str) -> list[RingMember]:
        """Who held ``key`` under earlier placements, if a miss here should ask them.

        Non-empty only within the handoff window, when this node is in the
        key's current replica set and the key's replicas changed: the members
        of the key's replica sets under every placement installed within the
        window, newest first, other than this node and the current replicas
        (every current replica got every write made under the current ring).
        """
        rings = self._rings
        current = rings.current
        if current is None or len(rings.history) < 2 or self.name not in current:
            return []
        now = self._clock()
        if now - rings.changed_at >= self.window_s or not self.owns(key, current):
            return []
        now_set = _incarnations(current.replica_set(key))
        out: list[RingMember] = []
        seen = set(now_set)
        # The placement before the newest one was current until the newest
        # was installed: it matters while that is within the window.
        for i in range(len(rings.history) - 2, -1, -1):
            if now - rings.installed_at[i + 1] >= self.window_s:
                break
            ring = rings.history[i]
            if not ring.members:
                continue
            for m in ring.replica_set(key):
                if m.incarnation_key not in seen and m.name != self.name:
                    seen.add(m.incarnation_key)
                    out.append(m)
            if len(out) >= MAX_PREVIOUS_OWNERS:
                break
        return out[:MAX_PREVIOUS_OWNERS]

    def peers(self) -> list[RingMember]:
        """Every other member of the current and previous rings (fencing targets)."""
        rings = self._rings
        seen: dict[str, RingMember] = {}
        for ring in (rings.current, rings.previous):  # fencing: the last change
            if ring is None:
                continue
            for m in ring.members:
                if m.name != self.name and m.name not in seen:
                    seen[m.name] = m
        return list(seen.values())
