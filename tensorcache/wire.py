"""Records that cross the wire, as plain values: protobuf <-> domain in one place.

Members (``pb.Member`` <-> ``RingMember``, ring snapshots -> ``Ring``: clients
and nodes build the same ring from one snapshot) and node statistics
(``pb.NodeStats`` -> ``NodeStats``). Everything else on the wire is read
where it is used: the request and reply headers of one call.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tensorcache.proto import tensorcache_pb2 as pb
from tensorcache.ring import Ring, RingMember


def from_pb(m: pb.Member) -> RingMember:
    return RingMember(
        name=m.name,
        address=m.address,
        capacity=m.capacity,
        data_address=m.data_address,
        local_pid=m.local_pid,
        local_token_addr=m.local_token_addr,
        local_token=m.local_token,
        incarnation=m.incarnation,
        data_ticket=m.data_ticket,
    )


def to_pb(m: RingMember) -> pb.Member:
    return pb.Member(
        name=m.name,
        address=m.address,
        capacity=m.capacity,
        data_address=m.data_address,
        local_pid=m.local_pid,
        local_token_addr=m.local_token_addr,
        local_token=m.local_token,
        incarnation=m.incarnation,
        data_ticket=m.data_ticket,
    )


def ring_from_snapshot(snap: pb.RingSnapshot) -> Ring:
    """The Ring a snapshot describes: clients and nodes build the same one."""
    return Ring(
        snap.epoch,
        [from_pb(m) for m in snap.members],
        vnodes=snap.vnodes or 40,
        weight_unit=snap.weight_unit or 1,
        replicas=snap.replicas or 1,
        invalidations={inv.prefix: inv.epoch for inv in snap.invalidations},
    )


def earlier_from_snapshot(snap: pb.RingSnapshot) -> list[tuple[Ring, float]]:
    """The placements before ``snap`` (newest first), each with seconds since it ended."""
    return [
        (
            Ring(
                p.epoch,
                [from_pb(m) for m in p.members],
                vnodes=snap.vnodes or 40,
                weight_unit=snap.weight_unit or 1,
                replicas=snap.replicas or 1,
            ),
            p.ended_ms_ago / 1000,
        )
        for p in snap.earlier
    ]


@dataclass(frozen=True)
class NodeStats:
    """One node's record from ``Client.stats()``."""

    name: str
    address: str
    keys: int
    bytes_used: int
    capacity: int
    hits: int
    misses: int
    evictions: int
    shards: int = 0
    bytes_reserved: int = 0
    puts: int = 0
    deletes: int = 0
    fills: int = 0
    fill_waits: int = 0
    handoffs: int = 0  # entries fetched from a previous owner on a miss (warm rebalance)
    drained: int = 0  # copies this node pushed to new owners on SIGTERM (confirmed)
    demoted: int = 0  # entries held but no longer owned (on their way to the new owners)
    invalidated: int = 0  # entries dropped by namespace invalidation
    #: Copies pushed to replica-set members that lacked them after ring changes.
    rereplicated: int = 0
    #: Demoted entries dropped once every member of their replica set confirmed a copy.
    moved: int = 0
    #: Hidden copies dropped: a newer copy or a delete was found elsewhere.
    discarded: int = 0
    #: Hidden copies served again: nobody held a newer one or deleted the key.
    revived: int = 0
    #: Copies the last rebalance scan found missing and could not push yet.
    pending: int = 0
    #: The disk tier (node --disk-path), all 0 without one: see proto NodeStats.
    disk_capacity: int = 0
    disk_bytes: int = 0
    disk_files: int = 0
    disk_hits: int = 0
    disk_spills: int = 0
    disk_write_drops: int = 0
    disk_evictions: int = 0
    disk_corrupt: int = 0
    disk_loaded: int = 0
    #: Bytes of pinned entries (never evicted), within ``pinned_capacity`` (node/pins.py).
    pinned_bytes: int = 0
    pinned_capacity: int = 0
    #: Pinned entries (tensors and stripes).
    pinned: int = 0
    #: Pinned copies moved here that found the quota full: stored unpinned.
    pins_dropped: int = 0
    policy: str = ""
    epoch: int = 0
    reachable: bool = True

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    @property
    def utilization(self) -> float:
        return self.bytes_used / self.capacity if self.capacity else 0.0


_STAT_FIELDS = tuple(f.name for f in dataclasses.fields(NodeStats) if f.name != "reachable")


def node_stats(s: pb.NodeStats) -> NodeStats:
    """A node's Stat reply as a record (every field of the record, by name)."""
    return NodeStats(**{name: getattr(s, name) for name in _STAT_FIELDS})


def unreachable(member: RingMember) -> NodeStats:
    """The record of a node that did not answer."""
    return NodeStats(member.name, member.address, 0, 0, member.capacity, 0, 0, 0, reachable=False)
