"""Pinned entries: never evicted, within a per-node pinned quota.

Model weights must not be pushed out of the cache by a burst of activations:
a worker that finds half a model gone pays a full load from storage. So an
entry can be *pinned*: the eviction policy never sees it, and its bytes are
charged to a pinned quota (``--pinned-capacity``), a part of the node's byte
budget, not an addition to it. The rules, and why:

- **Where the pin lives.** In the entry's metadata (``TensorMeta.pinned``),
  which travels with the bytes wherever the node logic copies an entry
  (replica writes, handoffs on a miss, re-replication pushes, SIGTERM
  drains): a pinned entry moved to another node is pinned there too, with no
  separate record to keep in step. The store keeps the decision it made
  (``Entry.pinned``), which is what eviction and the quota follow.
- **Quota.** A client's pinned put beyond the quota is refused with
  ``CapacityExceeded`` naming the quota, before its payload is received
  (and checked again at commit, all or nothing for the batch). A copy
  *moved* here (a handoff, a push, a drain) is never refused for its pin:
  losing the only copy of a value to keep a pin would be worse. It is stored
  unpinned and counted in ``pins_dropped``, which ``tensorcache stat`` shows.
- **Byte budget.** Pinned bytes count against ``--capacity`` like any other;
  the quota only bounds how much of it can never be evicted, so unpinned
  traffic always keeps ``capacity - pinned_capacity`` to evict within.
- **Overwrite.** A pin belongs to a value, not to a key: a put replaces the
  entry and its pin state with its own (pin=True or not). The replaced
  entry's pinned bytes are credited before the quota is checked.
- **Delete and invalidate** remove pinned entries like any other: a pin
  protects from eviction, not from the cluster's coherence rules (a model
  rollover must still drop the old revision).
- **Namespace pins** (``Client.pin(prefix)``) pin what every node holds
  under the prefix when called, all or nothing per node; a model revision
  is an immutable namespace, so pinning it once written covers all of it.
  Later puts under the prefix are pinned only if they say so
  (``put(..., pin=True)``): a node-local prefix list would not follow the
  keys to nodes that join later, and a cluster-wide one would need a record
  in the router for a rule the writer can state itself.
- **Disk tier** (node/tiered.py): a pinned entry is never an eviction
  victim, so it never spills to disk; a namespace pin leaves entries already
  spilled as they are (not pinned, still served from disk).
- **Cost**: a namespace pin scans the node's entries under its lock (a
  brief stall of that node's data path per million entries held).
"""

from __future__ import annotations

from tensorcache.errors import CapacityExceeded
from tensorcache.proto import tensorcache_pb2 as pb

#: The default quota: half of the node's capacity, so pins can never starve
#: unpinned traffic of more than half the node.
DEFAULT_PINNED_FRACTION = 0.5


def default_pinned_capacity(capacity: int) -> int:
    return int(capacity * DEFAULT_PINNED_FRACTION)


class PinQuota:
    """The pinned sub-budget's accounting; the store calls it under its lock."""

    __slots__ = ("capacity", "dropped", "entries", "used")

    def __init__(self, capacity: int, node_capacity: int) -> None:
        if not 0 <= capacity <= node_capacity:
            raise ValueError(
                f"pinned capacity must be 0..capacity ({node_capacity} bytes), got {capacity}"
            )
        self.capacity = capacity
        self.used = 0
        self.entries = 0
        self.dropped = 0

    def fits(self, nbytes: int) -> bool:
        return self.used + nbytes <= self.capacity

    def check(self, nbytes: int, what: str) -> None:
        """Raise CapacityExceeded unless ``nbytes`` more can be pinned."""
        if not self.fits(nbytes):
            raise CapacityExceeded(
                f"{what}: pinning {nbytes} more bytes would exceed this node's pinned quota "
                f"(--pinned-capacity {self.capacity} bytes, {self.used} pinned); "
                "unpin something or raise the quota"
            )

    def add(self, cost: int) -> None:
        self.used += cost
        self.entries += 1

    def remove(self, cost: int) -> None:
        self.used -= cost
        self.entries -= 1


def with_pin(meta: bytes, pinned: bool) -> bytes:
    """A serialized TensorMeta with its ``pinned`` flag set to ``pinned``."""
    m = pb.TensorMeta.FromString(meta)
    m.pinned = pinned
    return m.SerializeToString()
