"""What the store holds: entries, their cost, reservations and the version clock.

Plain values and small pieces shared by the store (node/store.py) and the
node logic around it. Entries are self-describing (the metadata travels with
the bytes) and carry the bookkeeping the cluster's rules need: version and
stamp (docs/consistency.md, "Versions"), the placement epoch they were last
judged at, and their holders (node/rebalance.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

# Bytes charged per entry beyond payload, key and metadata: what holding it
# really costs the node process, so a node full of tiny entries stays within
# its budget (#17). Measured (RSS growth per entry, 200k 8-byte entries put
# in batches, metadata kept serialized): 690 B with LRU, 743 with LFU in
# process, ~55 more in a node process (RPC buffers, allocator slack); the
# charge covers the dearest policy. Before the metadata was kept serialized
# and the last-use map folded into the entry, the same entry cost 1,075 B
# while 512 were charged: a node of small entries used about twice its
# --capacity.
ENTRY_OVERHEAD = 768

StoreKey = tuple[int, str]  # (EntryKind, key)
#: A stored payload piece: bytes from gRPC, an ndarray or a slice from the data channel.
Chunk = bytes | bytearray | memoryview | np.ndarray
Holder = tuple[str, str, int]  # a member's (name, address, incarnation)
NO_HOLDERS: frozenset[Holder] = frozenset()


@dataclass(slots=True, eq=False)
class Entry:
    """One stored value. ``key`` to ``stamp`` never change after commit; the
    bookkeeping fields (``demoted``, ``checked``, ``holders``) are updated in
    place under the store's lock (readers holding an entry only use its bytes)."""

    key: StoreKey
    meta: Any  # opaque to the store (the node keeps a serialized TensorMeta here)
    chunks: tuple[Chunk, ...]
    version: int
    cost: int  # bytes charged against the budget
    stamp: int = 0  # the epoch the value was first committed at
    demoted: bool = False  # held for handoffs only: this node no longer owns the key
    checked: int = 0  # the placement epoch this entry was last judged at
    holders: frozenset[Holder] = NO_HOLDERS  # who is known to hold a copy this new
    used: int = 0  # the store's use counter at this entry's last insert or get
    pinned: bool = False  # never evicted; charged to the pinned quota (node/pins.py)


class Judge(Protocol):
    """The node's placement rule (node/rings.py ``RingView``), as the store sees it."""

    @property
    def placement_epoch(self) -> int: ...

    def placement(self, key: str, checked: int, demoted: bool) -> str: ...

    def in_window(self) -> bool:
        """Whether a ring change is recent enough for handoffs and pushes (floors kept)."""
        ...


@dataclass(frozen=True, slots=True)
class NewEntry:
    key: StoreKey
    meta: Any
    chunks: tuple[Chunk, ...]
    cost: int
    if_version: int | None = None  # commit only if the current version is this (0: absent)
    #: > 0: store exactly this version (replica, handoff and drain writes),
    #: unless the store holds a newer one; 0: the store assigns the next one.
    version: int = 0
    stamp: int = 0
    #: The key's version elsewhere (its previous owners), known to the node:
    #: the current version for ``if_version`` when the store has none, and a
    #: floor for the version assigned.
    known_version: int = 0
    checked: int = 0  # placement epoch the writer placed it under
    holders: frozenset[Holder] = NO_HOLDERS
    #: Pin it (never evicted). ``pin_strict``: a client's write, refused with
    #: CapacityExceeded beyond the pinned quota; otherwise (a copy moved
    #: here) it is stored unpinned then, and counted (node/pins.py).
    pinned: bool = False
    pin_strict: bool = False


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
    demoted: int = 0  # entries held for handoffs only (not in entries_by_kind)
    invalidated: int = 0  # entries dropped because the stale rule selected them
    moved: int = 0  # demoted entries dropped once their new owners confirmed a copy
    discarded: int = 0  # hidden copies dropped: a newer one or a delete was found elsewhere
    revived: int = 0  # hidden entries served again once no newer copy was found
    pinned_bytes: int = 0  # bytes of pinned entries (within pinned_capacity)
    pinned_capacity: int = 0
    pinned: int = 0  # pinned entries
    pins_dropped: int = 0  # pinned copies moved here stored unpinned: the quota was full


def entry_cost(key: str, payload: int, meta_bytes: int) -> int:
    """Bytes an entry pins in the budget."""
    return payload + len(key.encode("utf-8")) + meta_bytes + ENTRY_OVERHEAD


class Reservation:
    """Bytes set aside for one put in flight; commit or release it exactly once."""

    __slots__ = ("done", "nbytes")

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.done = False


# The largest version a node takes from anyone, client or peer. Versions are
# wall-clock microseconds (~2**51 today, 2**62 in 146,000 years), and the clock
# absorbs every version it is given: one at 2**64-1 would leave no next
# version and fail every later write on the node (found by the wire fuzzer,
# tests/integration/fuzzwire.py). Puts refuse more (node/ops.py); handoff
# answers claiming more are ignored (node/handoff.py).
MAX_VERSION = 2**62


class VersionClock:
    """Node-wide version source, a hybrid logical clock: strictly increasing,
    seeded from wall-clock µs, and pushed past every version the node sees.

    Seeding from the clock keeps versions increasing across a restart of the
    node (as long as the clock does not step back by more than the downtime);
    the +1 keeps them unique and increasing within a process even if it does;
    ``absorb`` keeps them above versions other nodes assigned (replica writes,
    handoffs, drains), so a key's next version exceeds every copy's.
    Not thread-safe: the store calls it under its lock.
    """

    def __init__(self, wall_ns: Callable[[], int] = time.time_ns) -> None:
        self._wall_ns = wall_ns
        self._last = 0

    def tick(self) -> int:
        self._last = max(self._last + 1, self._wall_ns() // 1000)
        return self._last

    def absorb(self, version: int) -> None:
        """Make every later ``tick`` exceed ``version``."""
        if version > self._last:
            self._last = version
