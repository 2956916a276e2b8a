"""The node's in-RAM store: a strict byte budget around an eviction policy.

Values are kept as the chunks they arrived in (immutable ``bytes``), ready to
be sent again without copying. The budget counts every byte an entry pins
(payload, key, metadata and a fixed overhead) plus the bytes of puts still
in flight: a put *reserves* its size before the first payload byte is read,
evicting as needed, so receiving can never push the node over its budget.

A put is all-or-nothing: its entries become visible together at ``commit``;
an aborted put releases its reservation and leaves nothing behind.

Versions and visibility (docs/consistency.md): every entry carries the
version it was committed with and its *stamp* (the epoch it was first
committed at). An entry is *demoted* when its node stops owning its key: it
is then invisible to ordinary reads and conditional writes, still readable
by handoffs and evicted first. An entry the ``stale`` rule selects (a
namespace invalidation covers it) no longer exists: it is dropped when met.

Placement is judged lazily too (``Judge``): each entry remembers the
placement epoch it was last checked at, and an entry met with an older one
is judged then (kept, demoted, or discarded when its key came back from
elsewhere), so a ring change costs O(1) here and the node's background scan
(node/rebalance.py) catches up with everything else in small steps. Each
entry also remembers its *holders*: the members (by incarnation) known to
hold a copy at least as new, which tells that scan whom to push it to.

Version floors: while a ring change is recent (the judge's handoff window),
every key removed here (moved away, dropped, evicted, deleted) leaves its
*floor*: the removed version, or a delete's tombstone version. A copy with
an explicit version (a push, a handoff) below the floor is stale and is not
committed: the value it would bring back was overwritten or deleted here
(docs/consistency.md, "Handoff"). A key still held needs no floor: the
commit keeps the newer version. The check and the removal share the lock,
so no push can slip in between. At most ``MAX_FLOORS`` are kept; past that
the floors are dropped and ``floors_lost`` says so until the window closes
(the node then hands nothing off: a miss is always safe).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from tensorcache.errors import CapacityExceeded, VersionConflict
from tensorcache.node.entry import (
    ENTRY_OVERHEAD,
    NO_HOLDERS,
    Chunk,
    Entry,
    Holder,
    Judge,
    NewEntry,
    Reservation,
    StoreKey,
    StoreStats,
    VersionClock,
    entry_cost,
)
from tensorcache.node.pins import PinQuota, default_pinned_capacity, with_pin
from tensorcache.node.policy import EvictionPolicy, make_policy

# Floors kept within one handoff window (about 100 B each).
MAX_FLOORS = 1_000_000

__all__ = [
    "ENTRY_OVERHEAD",
    "NO_HOLDERS",
    "Chunk",
    "Entry",
    "Holder",
    "Judge",
    "NewEntry",
    "Reservation",
    "Store",
    "StoreKey",
    "StoreStats",
    "VersionClock",
    "entry_cost",
]


@dataclass
class _Counters:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    puts: int = 0
    deletes: int = 0
    invalidated: int = 0
    moved: int = 0
    discarded: int = 0
    revived: int = 0
    by_kind: dict[int, int] = field(default_factory=dict)  # visible entries only


class Spare(Protocol):
    """Memory held for reuse outside the entries (node/recvpool.py's RecvPool)."""

    def pooled_bytes(self) -> int: ...

    def free_bytes(self) -> int: ...

    def release_free(self, nbytes: int) -> None: ...


class Store:
    """Thread-safe byte-budgeted map of entries with pluggable eviction.

    ``stale``: a rule the node sets up once (namespace invalidation); an entry
    it selects is treated as absent everywhere and dropped when met.
    ``judge``: the placement rule; an entry whose ``checked`` is older than
    the judge's placement epoch is judged when met (names: node/rings.py
    ``Placement``: "keep", "demote", "discard"). Both are called with the
    store's lock held, so they must not call back into the store.
    """

    def __init__(
        self,
        capacity: int,
        policy: str | EvictionPolicy = "lru",
        *,
        counted_kinds: Sequence[int] = (0,),
        stale: Callable[[Entry], bool] | None = None,
        judge: Judge | None = None,
        pinned_capacity: int | None = None,
    ) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity must be > 0 bytes, got {capacity}")
        self._capacity = capacity
        # Pinned entries (node/pins.py): never in the policy, so never a victim.
        self._pins = PinQuota(
            default_pinned_capacity(capacity) if pinned_capacity is None else pinned_capacity,
            capacity,
        )
        self._policy = make_policy(policy) if isinstance(policy, str) else policy
        self._counted = frozenset(counted_kinds)  # kinds whose gets count as hits/misses
        self._stale = stale
        self._judge = judge
        self._interned: dict[frozenset[Holder], frozenset[Holder]] = {}
        self._entries: dict[StoreKey, Entry] = {}
        # Demoted keys, oldest demotion first: evicted before anything else.
        self._demoted: dict[StoreKey, None] = {}
        self._uses = 0  # a counter of uses; each entry keeps its last (Entry.used)
        self._used = 0
        self._reserved = 0
        self._clock = VersionClock()
        self._floors: dict[StoreKey, int] = {}
        self._floors_lost = False
        self._c = _Counters()
        self._lock = threading.Lock()
        # Memory the node keeps outside its entries (node/recvpool.py: free
        # receive buffers): inside the budget too, given back before evicting.
        self._spare: Spare | None = None

    @property
    def capacity(self) -> int:
        return self._capacity

    def keep_spare_within_budget(self, spare: Spare) -> None:
        """Count ``spare``'s idle memory against the byte budget from now on.

        Idle receive buffers are real RSS outside every entry: left alone, a
        node whose large entries were deleted and whose store then filled with
        other entries would hold up to ``capacity`` plus the whole pool. So a
        reservation that would not fit beside them gives them back first,
        before anything is evicted (docs/capacity: RSS stays within the
        capacity bound).
        """
        self._spare = spare

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
            self._trim_spare_locked(nbytes)  # idle buffers go before any entry
            while self._used + self._reserved + nbytes > self._capacity:
                if not self._evict_one_locked():
                    raise CapacityExceeded(
                        f"no room for {nbytes} bytes: {self._reserved} bytes are reserved by "
                        f"puts in flight and {self._pins.used} are pinned on a node of "
                        f"capacity {self._capacity}; retry later"
                    )
            self._reserved += nbytes
            # Evicted entries' buffers may have joined the spare memory.
            self._trim_spare_locked(0)
        return Reservation(nbytes)

    def _trim_spare_locked(self, extra: int) -> None:
        """Give back idle spare memory that does not fit in the budget beside
        the entries, the reservations and ``extra`` more bytes."""
        spare = self._spare
        if spare is None:
            return
        base = self._used + self._reserved + extra
        # Cheap first: buffers in use are entries too, so this overcounts.
        if base + spare.pooled_bytes() <= self._capacity:
            return
        over = base + spare.free_bytes() - self._capacity
        if over > 0:
            spare.release_free(over)

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

        An item with an explicit ``version`` that finds a newer visible one
        keeps it: its result is the kept version (so ``version`` differs from
        the item's) and no replaced entry. Replaced entries are reported only
        if they were visible (not demoted, not stale): their stripes are then
        garbage; those of a hidden entry may belong to a live copy elsewhere.

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
                    current = self._visible_locked(item.key)
                    have = current.version if current is not None else item.known_version
                    if have != item.if_version:
                        raise VersionConflict(
                            f"{item.key[1][:200]!r} is at version {have}, "
                            f"the put was conditional on {item.if_version}"
                        )
            self._check_pins_locked(items, "put")
            reservation.done = True
            self._reserved -= reservation.nbytes
            for item in items:
                current = self._visible_locked(item.key)
                if item.version > 0:
                    self._clock.absorb(item.version)
                    if current is not None and current.version > item.version:
                        out.append((current.version, None))  # kept the newer one
                        continue
                    if current is not None and current.version == item.version:
                        # The same copy again (a push, a retried replica
                        # write): keep it, and what it knows of its holders;
                        # replacing it forgot them and the two holders pushed
                        # it back and forth at every ring change.
                        current.holders = self._intern(current.holders | item.holders)
                        out.append((current.version, None))
                        continue
                    held = self._entries.get(item.key)  # hidden ones too
                    if item.version < max(
                        held.version if held is not None else 0, self._floor_locked(item.key)
                    ):
                        # A newer copy held hidden, or overwritten or deleted
                        # here since: this one is stale.
                        out.append((held.version if held is not None else 0, None))
                        continue
                    version = item.version
                else:
                    self._clock.absorb(item.known_version)
                    version = self._clock.tick()
                old = self._remove_locked(item.key)
                pinned = item.pinned
                if pinned and not item.pin_strict and not self._pins.fits(item.cost):
                    pinned = False  # a moved copy is kept, unpinned (node/pins.py)
                    self._pins.dropped += 1
                entry = Entry(
                    item.key,
                    item.meta,
                    item.chunks,
                    version,
                    item.cost,
                    item.stamp,
                    checked=item.checked,
                    holders=self._intern(item.holders),
                    pinned=pinned,
                )
                self._insert_locked(entry)
                self._c.puts += 1
                out.append((version, old if old is current else None))
            # Items of one batch may replace each other's keys; the budget
            # still holds because each replaced entry was removed above.
        return out

    # -- reads and deletes ----------------------------------------------------
    def get(self, key: StoreKey, *, demoted_ok: bool = False) -> Entry | None:
        """The visible entry of ``key``; with ``demoted_ok`` a demoted one too.

        Ordinary gets count as hits or misses and refresh the key's recency;
        ``demoted_ok`` reads (handoffs to other nodes) do neither.
        """
        with self._lock:
            entry = self._visible_locked(key, demoted_ok=demoted_ok)
            if demoted_ok:
                return entry
            if key[0] in self._counted:
                if entry is None:
                    self._c.misses += 1
                else:
                    self._c.hits += 1
            if entry is not None:
                self._policy.accessed(key)
                self._uses += 1
                entry.used = self._uses
            return entry

    def peek(self, key: StoreKey) -> Entry | None:
        """The visible entry of ``key`` (no statistics, no recency update)."""
        with self._lock:
            return self._visible_locked(key)

    def suspect(self, key: StoreKey) -> Entry | None:
        """A demoted entry of ``key`` (no statistics): one the node may revive."""
        with self._lock:
            entry = self._visible_locked(key, demoted_ok=True)
            return entry if entry is not None and entry.demoted else None

    def revive(self, entry: Entry, epoch: int, holders: frozenset[Holder]) -> bool:
        """Serve a demoted ``entry`` again (the node vouched for it); False if it changed."""
        with self._lock:
            if self._entries.get(entry.key) is not entry or not entry.demoted:
                return False
            entry.demoted = False
            del self._demoted[entry.key]
            self._c.by_kind[entry.key[0]] = self._c.by_kind.get(entry.key[0], 0) + 1
            entry.checked = max(entry.checked, epoch)
            entry.holders = self._intern(holders)
            self._c.revived += 1
            return True

    def drop(self, entry: Entry) -> bool:
        """Remove ``entry`` if it is still the one stored (counted as discarded)."""
        with self._lock:
            if self._entries.get(entry.key) is not entry:
                return False
            self._remove_locked(entry.key)
            self._c.discarded += 1
            return True

    def contains(self, key: StoreKey) -> bool:
        """Whether ``key`` is visible (no statistics, no recency update)."""
        with self._lock:
            return self._visible_locked(key) is not None

    def delete(self, key: StoreKey, *, tombstone: int = 0) -> Entry | None:
        """Remove ``key``; returns the entry if it was visible (a hidden one goes silently).

        ``tombstone``: the delete's version (``tombstone()``), kept as the
        key's floor while the handoff window is open, held here or not.
        """
        with self._lock:
            current = self._visible_locked(key)
            self._remove_locked(key)
            if tombstone:
                self._set_floor_locked(key, tombstone)
            if current is not None:
                self._c.deletes += 1
            return current

    def floor(self, key: StoreKey) -> int:
        """The version below which a copy of ``key`` is stale here (0: none known)."""
        with self._lock:
            return self._floor_locked(key)

    def floors_lost(self) -> bool:
        """Whether floors were dropped (too many) in the open window: hand nothing off."""
        with self._lock:
            self._floor_locked(None)
            return self._floors_lost

    def demote(self, keys: Iterable[StoreKey]) -> int:
        """Demote the visible entries of ``keys``; returns how many were."""
        n = 0
        with self._lock:
            for key in keys:
                entry = self._entries.get(key)
                if entry is None or entry.demoted:
                    continue
                self._demote_locked(entry)
                n += 1
        return n

    def drop_demoted(self, keys: Iterable[StoreKey]) -> int:
        """Remove the demoted entries among ``keys``; returns how many (counted as discarded)."""
        n = 0
        with self._lock:
            for key in keys:
                entry = self._entries.get(key)
                if entry is not None and entry.demoted:
                    self._remove_locked(key)
                    n += 1
            self._c.discarded += n
        return n

    def judge(self, keys: Iterable[StoreKey]) -> list[Entry]:
        """Bring ``keys`` up to date (invalidation, placement); return those still held.

        Demoted entries are returned too. The background scan calls this a
        few hundred keys at a time, so the lock is held briefly.
        """
        out: list[Entry] = []
        with self._lock:
            for key in keys:
                entry = self._visible_locked(key, demoted_ok=True)
                if entry is not None:
                    out.append(entry)
        return out

    def add_holders(
        self, entry: Entry, holders: Iterable[Holder], wanted: frozenset[Holder]
    ) -> bool:
        """Record that ``holders`` hold a copy of ``entry`` (as new or newer).

        A demoted entry whose holders now cover ``wanted`` (its key's current
        replica set) has moved: it is dropped, counted in ``moved``. Returns
        whether it was. Nothing happens if ``entry`` was replaced meanwhile.
        """
        with self._lock:
            if self._entries.get(entry.key) is not entry:
                return False
            entry.holders = self._intern(entry.holders | frozenset(holders))
            if entry.demoted and wanted <= entry.holders:
                self._remove_locked(entry.key)
                self._c.moved += 1
                return True
            return False

    def drop_moved(self, entry: Entry, wanted: frozenset[Holder]) -> bool:
        """Drop a demoted ``entry`` whose holders cover ``wanted``; returns whether it was."""
        return self.add_holders(entry, (), wanted)

    def check_pins(self, items: Sequence[NewEntry], what: str) -> None:
        """Raise CapacityExceeded if the strictly pinned ``items`` would not fit the quota.

        The node asks before receiving a put's payload; commit checks again.
        """
        with self._lock:
            self._check_pins_locked(items, what)

    def pin_prefix(self, prefix: str, pinned: bool) -> tuple[int, int]:
        """Pin (or unpin) every stored entry under ``prefix``; returns (entries, bytes) changed.

        All or nothing: if the entries to pin do not fit in the quota, none
        is pinned (CapacityExceeded). Demoted entries count: they may be the
        only copy, on their way to the new owners, who then pin them too.
        The entry's metadata is rewritten so the pin travels with it.
        """
        with self._lock:
            todo = [
                e
                for key, e in list(self._entries.items())
                if key[1].startswith(prefix)
                and e.pinned != pinned
                # Entries spilled to a disk tier (node/tiered.py; their chunks
                # are a lazy file reference, not a tuple) keep their state:
                # pinning is about RAM, and they are served from disk anyway.
                and isinstance(e.chunks, tuple)
                and self._visible_locked(key, demoted_ok=True) is e
            ]
            nbytes = sum(e.cost for e in todo)
            if pinned:
                self._pins.check(nbytes, f"pin {prefix!r}")
            for e in todo:
                e.meta = with_pin(e.meta, pinned)
                e.pinned = pinned
                if pinned:
                    self._policy.removed(e.key)
                    self._pins.add(e.cost)
                else:
                    self._pins.remove(e.cost)
                    self._policy.inserted(e.key)
            return len(todo), nbytes

    def tombstone(self) -> int:
        """A version above every version this node has seen: a delete's, for settling."""
        with self._lock:
            return self._clock.tick()

    def absorb(self, version: int) -> None:
        """Move the version clock past ``version`` (a version heard of elsewhere)."""
        with self._lock:
            self._clock.absorb(version)

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
                demoted=len(self._demoted),
                invalidated=self._c.invalidated,
                moved=self._c.moved,
                discarded=self._c.discarded,
                revived=self._c.revived,
                pinned_bytes=self._pins.used,
                pinned_capacity=self._pins.capacity,
                pinned=self._pins.entries,
                pins_dropped=self._pins.dropped,
            )

    def keys(self) -> list[StoreKey]:
        """Every stored key, demoted ones included."""
        with self._lock:
            return list(self._entries)

    def hottest(self) -> list[Entry]:
        """Every stored entry, demoted ones included, most recently used first."""
        with self._lock:
            return sorted(self._entries.values(), key=lambda e: e.used, reverse=True)

    # -- internals (lock held) ------------------------------------------------
    def _visible_locked(self, key: StoreKey, *, demoted_ok: bool = False) -> Entry | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self._stale is not None and self._stale(entry):
            self._remove_locked(key)
            self._c.invalidated += 1
            return None
        judge = self._judge
        if judge is not None and entry.checked < judge.placement_epoch:
            epoch = judge.placement_epoch
            verdict = judge.placement(key[1], entry.checked, entry.demoted)
            if verdict == "discard":
                # Its key lived elsewhere meanwhile: this copy may be stale, so
                # it is hidden, not served; but it may also be the last copy
                # (its only other holder crashed), so it is kept and offered
                # to the key's other replicas again (holders forgotten): they
                # keep a newer value if they have one, and ignore a copy of a
                # key deleted there (node/rebalance.py, node/ops.py).
                if not entry.demoted:
                    self._demote_locked(entry)
                entry.holders = NO_HOLDERS
                entry.checked = epoch
                return entry if demoted_ok else None
            if verdict == "demote":
                # Pushed to every member of its new replica set, confirmed one
                # by one, before it may be dropped as moved: assumed holders
                # (a client's write placement) are not enough.
                if not entry.demoted:
                    self._demote_locked(entry)
                entry.holders = NO_HOLDERS
            elif verdict == "keep-reset":
                entry.holders = NO_HOLDERS
            entry.checked = epoch
        if entry.demoted and not demoted_ok:
            return None
        return entry

    def _intern(self, holders: frozenset[Holder]) -> frozenset[Holder]:
        """One shared object per distinct holder set (there are few: replica sets)."""
        if not holders:
            return NO_HOLDERS
        got = self._interned.get(holders)
        if got is None:
            if len(self._interned) >= 65536:
                self._interned.clear()
            got = self._interned[holders] = holders
        return got

    def _check_pins_locked(self, items: Sequence[NewEntry], what: str) -> None:
        need = 0
        for item in items:
            if item.pinned and item.pin_strict:
                current = self._entries.get(item.key)
                credit = current.cost if current is not None and current.pinned else 0
                need += item.cost - credit
        if need > 0:
            self._pins.check(need, what)

    def _demote_locked(self, entry: Entry) -> None:
        entry.demoted = True
        self._c.by_kind[entry.key[0]] -= 1
        self._demoted[entry.key] = None

    def _insert_locked(self, entry: Entry) -> None:
        key = entry.key
        self._entries[key] = entry
        self._used += entry.cost
        if entry.demoted:
            self._demoted[key] = None
        else:
            self._c.by_kind[key[0]] = self._c.by_kind.get(key[0], 0) + 1
        if entry.pinned:
            self._pins.add(entry.cost)
        else:
            self._policy.inserted(key)
        self._uses += 1
        entry.used = self._uses

    def _window_open(self) -> bool:
        return self._judge is not None and self._judge.in_window()

    def _floor_locked(self, key: StoreKey | None) -> int:
        if (self._floors or self._floors_lost) and not self._window_open():
            self._floors.clear()  # the window closed: nothing older can come back
            self._floors_lost = False
        return self._floors.get(key, 0) if key is not None and self._floors else 0

    def _set_floor_locked(self, key: StoreKey, version: int) -> None:
        if not self._window_open() or self._floors_lost:
            return
        old = self._floors.get(key, 0)
        if version <= old:
            return
        if not old and len(self._floors) >= MAX_FLOORS:
            self._floors.clear()
            self._floors_lost = True
            return
        self._floors[key] = version

    def _remove_locked(self, key: StoreKey) -> Entry | None:
        old = self._entries.pop(key, None)
        if old is not None:
            self._set_floor_locked(key, old.version)
            self._used -= old.cost
            if old.demoted:
                del self._demoted[old.key]
            else:
                self._c.by_kind[old.key[0]] -= 1
            if old.pinned:
                self._pins.remove(old.cost)
            else:
                self._policy.removed(key)
        return old

    def _evict_one_locked(self) -> bool:
        # Demoted entries take their turn in the policy's order like any
        # other: one still here has not reached its new owners yet (those
        # that have are dropped as moved), so it may be the only copy.
        victim = self._policy.victim()
        if victim is None:
            return False
        self._remove_locked(victim)  # type: ignore[arg-type]  # the policy holds our keys
        self._c.evictions += 1
        return True
