"""The node's in-RAM store: a strict byte budget around an eviction policy.

Values are kept as the chunks they arrived in (immutable ``bytes``), ready to
be sent again without copying. The budget counts every byte an entry pins
(payload, key, metadata and a fixed overhead) plus the bytes of puts still
in flight: a put *reserves* its size before the first payload byte is read,
evicting as needed, so receiving can never push the node over its budget.

A put is all-or-nothing: its entries become visible together at ``commit``;
an aborted put releases its reservation and leaves nothing behind.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tensorcache.errors import CapacityExceeded, VersionConflict
from tensorcache.node.policy import EvictionPolicy, make_policy

# Bytes charged per entry beyond payload, key and metadata: the Python
# objects (entry, chunk list, dict slot, policy slot) that hold it.
ENTRY_OVERHEAD = 512

StoreKey = tuple[int, str]  # (EntryKind, key)


@dataclass(frozen=True, slots=True)
class Entry:
    key: StoreKey
    meta: Any  # opaque to the store (the node keeps a protobuf TensorMeta here)
    chunks: tuple[bytes, ...]
    version: int
    cost: int  # bytes charged against the budget


@dataclass(frozen=True, slots=True)
class NewEntry:
    key: StoreKey
    meta: Any
    chunks: tuple[bytes, ...]
    cost: int
    if_version: int | None = None  # commit only if the current version is this (0: absent)


@dataclass(frozen=True, slots=True)
class StoreStats:
    entries_by_kind: dict[int, int]
    bytes_used: int
    bytes_reserved: int
    capacity: int
    hits: int
    misses: int
    evictions: int
    puts: int
    deletes: int
    policy: str


def entry_cost(key: str, payload: int, meta_bytes: int) -> int:
    """Bytes an entry pins in the budget."""
    return payload + len(key.encode("utf-8")) + meta_bytes + ENTRY_OVERHEAD


class Reservation:
    """Bytes set aside for one put in flight; commit or release it exactly once."""

    __slots__ = ("done", "nbytes")

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.done = False


class VersionClock:
    """Node-wide version source: strictly increasing, seeded from wall-clock µs.

    Seeding from the clock keeps versions increasing across a restart of the
    node (as long as the clock does not step back by more than the downtime);
    the +1 keeps them unique and increasing within a process even if it does.
    """

    def __init__(self) -> None:
        self._last = 0

    def tick(self) -> int:
        self._last = max(self._last + 1, time.time_ns() // 1000)
        return self._last


@dataclass
class _Counters:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    puts: int = 0
    deletes: int = 0
    by_kind: dict[int, int] = field(default_factory=dict)


class Store:
    """Thread-safe byte-budgeted map of entries with pluggable eviction."""

    def __init__(
        self,
        capacity: int,
        policy: str | EvictionPolicy = "lru",
        *,
        counted_kinds: Sequence[int] = (0,),
    ) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity must be > 0 bytes, got {capacity}")
        self._capacity = capacity
        self._policy = make_policy(policy) if isinstance(policy, str) else policy
        self._counted = frozenset(counted_kinds)  # kinds whose gets count as hits/misses
        self._entries: dict[StoreKey, Entry] = {}
        self._used = 0
        self._reserved = 0
        self._clock = VersionClock()
        self._c = _Counters()
        self._lock = threading.Lock()

    @property
    def capacity(self) -> int:
        return self._capacity

    # -- puts -----------------------------------------------------------------
    def reserve(self, nbytes: int) -> Reservation:
        """Set ``nbytes`` aside, evicting entries as needed.

        Raises CapacityExceeded when ``nbytes`` exceeds the whole budget, or
        when puts in flight hold so much that eviction cannot make room.
        """
        if nbytes > self._capacity:
            raise CapacityExceeded(
                f"value needs {nbytes} bytes, more than this node's capacity of {self._capacity}"
            )
        with self._lock:
            if self._reserved + nbytes > self._capacity:
                # Evicting cannot help: don't empty the cache only to fail.
                raise CapacityExceeded(
                    f"no room for {nbytes} bytes: {self._reserved} bytes are reserved by "
                    f"puts in flight on a node of capacity {self._capacity}; retry later"
                )
            while self._used + self._reserved + nbytes > self._capacity:
                if not self._evict_one_locked():
                    raise CapacityExceeded(
                        f"no room for {nbytes} bytes: {self._reserved} bytes are reserved by "
                        f"puts in flight on a node of capacity {self._capacity}; retry later"
                    )
            self._reserved += nbytes
        return Reservation(nbytes)

    def release(self, reservation: Reservation) -> None:
        """Give back an uncommitted reservation (aborted put). Idempotent."""
        with self._lock:
            if not reservation.done:
                reservation.done = True
                self._reserved -= reservation.nbytes

    def commit(
        self, reservation: Reservation, items: Sequence[NewEntry]
    ) -> list[tuple[int, Entry | None]]:
        """Make ``items`` visible together; return (version, replaced entry) for each.

        The items must fit in the reservation (the node computes both from
        the same header, so a mismatch is a bug, reported as ValueError).
        """
        total = sum(item.cost for item in items)
        if total > reservation.nbytes:
            raise ValueError(
                f"commit of {total} bytes exceeds its reservation of {reservation.nbytes}"
            )
        out: list[tuple[int, Entry | None]] = []
        with self._lock:
            if reservation.done:
                raise ValueError("reservation already committed or released")
            # Conditions first, all of them, so a batch commits all or nothing.
            for item in items:
                if item.if_version is not None:
                    current = self._entries.get(item.key)
                    have = current.version if current is not None else 0
                    if have != item.if_version:
                        raise VersionConflict(
                            f"{item.key[1][:200]!r} is at version {have}, "
                            f"the put was conditional on {item.if_version}"
                        )
            reservation.done = True
            self._reserved -= reservation.nbytes
            for item in items:
                old = self._remove_locked(item.key)
                entry = Entry(item.key, item.meta, item.chunks, self._clock.tick(), item.cost)
                self._entries[item.key] = entry
                self._used += entry.cost
                self._c.by_kind[item.key[0]] = self._c.by_kind.get(item.key[0], 0) + 1
                self._policy.inserted(item.key)
                self._c.puts += 1
                out.append((entry.version, old))
            # Items of one batch may replace each other's keys; the budget
            # still holds because each replaced entry was removed above.
        return out

    # -- reads and deletes ----------------------------------------------------
    def get(self, key: StoreKey) -> Entry | None:
        with self._lock:
            entry = self._entries.get(key)
            if key[0] in self._counted:
                if entry is None:
                    self._c.misses += 1
                else:
                    self._c.hits += 1
            if entry is not None:
                self._policy.accessed(key)
            return entry

    def contains(self, key: StoreKey) -> bool:
        """Whether ``key`` is stored (no statistics, no recency update)."""
        with self._lock:
            return key in self._entries

    def delete(self, key: StoreKey) -> Entry | None:
        with self._lock:
            old = self._remove_locked(key)
            if old is not None:
                self._c.deletes += 1
            return old

    def purge(self, drop: Callable[[StoreKey], bool]) -> int:
        """Remove every entry whose key ``drop`` selects; returns how many.

        Counted as evictions (the node uses it for entries it stopped owning).
        """
        with self._lock:
            victims = [k for k in self._entries if drop(k)]
            for k in victims:
                self._remove_locked(k)
            self._c.evictions += len(victims)
        return len(victims)

    def stats(self) -> StoreStats:
        with self._lock:
            return StoreStats(
                entries_by_kind=dict(self._c.by_kind),
                bytes_used=self._used,
                bytes_reserved=self._reserved,
                capacity=self._capacity,
                hits=self._c.hits,
                misses=self._c.misses,
                evictions=self._c.evictions,
                puts=self._c.puts,
                deletes=self._c.deletes,
                policy=self._policy.name,
            )

    def keys(self) -> list[StoreKey]:
        with self._lock:
            return list(self._entries)

    # -- internals (lock held) ------------------------------------------------
    def _remove_locked(self, key: Hashable) -> Entry | None:
        old = self._entries.pop(key, None)  # type: ignore[call-overload]
        if old is not None:
            self._used -= old.cost
            self._c.by_kind[old.key[0]] -= 1
            self._policy.removed(key)
        return old

    def _evict_one_locked(self) -> bool:
        victim = self._policy.victim()
        if victim is None:
            return False
        self._remove_locked(victim)
        self._c.evictions += 1
        return True
