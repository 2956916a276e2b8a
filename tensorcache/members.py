"""Membership records between their wire form (pb.Member) and the ring's (RingMember)."""

from __future__ import annotations

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
