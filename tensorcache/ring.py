"""The consistent-hash ring: a pure, immutable snapshot of placement.

A ``Ring`` is built once per membership change and never mutated; whoever
places a key takes one snapshot and uses it for the whole request, and
every placement-dependent RPC carries its ``epoch``. No I/O, no locks.

Nodes are hashed by their stable *name* (a StatefulSet pod name, an etcd
member key), never by address, so a node that restarts on a new port keeps
its keys. Each member gets ``vnodes * weight`` points on the ring, its weight
being its capacity in ``weight_unit`` steps (at least 1), so a node with
twice the memory owns about twice the keys. The ring itself is uhashring's
(md5 of "<name>-<i>" points, md5 of the key) unless a ``hash_fn`` is given;
md5 is stable across processes and machines, unlike Python's ``hash()``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from uhashring import HashRing

from tensorcache.errors import Unavailable

DEFAULT_VNODES = 40
DEFAULT_WEIGHT_UNIT = 256 * 1024 * 1024
_OWNER_CACHE_SIZE = 65536


@dataclass(frozen=True, slots=True)
class RingMember:
    name: str
    address: str
    capacity: int
    data_address: str = ""  # the node's TCP data channel ("" = gRPC only)
    # Co-located fast path (tensorcache/localread.py); 0/empty = not offered.
    local_pid: int = 0
    local_token_addr: int = 0
    local_token: bytes = b""
    # Random per process start: a node restarted under its old name (and,
    # with a stable DNS name, its old address) is a new, empty member.
    incarnation: int = 0
    # The data channel is plaintext and opens with a ticket (tensorcache/tickets.py).
    data_ticket: bool = False

    @property
    def incarnation_key(self) -> tuple[str, str, int]:
        """Who holds a copy: one process of one member, never a name alone."""
        return (self.name, self.address, self.incarnation)


def invalidated_before(table: Mapping[str, int], key: str) -> int:
    """The newest epoch in ``table`` (prefix -> epoch) whose prefix covers ``key`` (0: none).

    An entry of ``key`` committed at an epoch below this no longer exists.
    O(number of invalidated prefixes): a handful per model rollover.
    """
    best = 0
    for prefix, epoch in table.items():
        if epoch > best and key.startswith(prefix):
            best = epoch
    return best


class Ring:
    """An immutable consistent-hash placement snapshot."""

    def __init__(
        self,
        epoch: int,
        members: list[RingMember] | tuple[RingMember, ...],
        *,
        vnodes: int = DEFAULT_VNODES,
        weight_unit: int = DEFAULT_WEIGHT_UNIT,
        hash_fn: Callable[[str], int] | None = None,
        replicas: int = 1,
        invalidations: Mapping[str, int] | None = None,
    ) -> None:
        if vnodes < 1 or weight_unit < 1:
            raise ValueError("vnodes and weight_unit must be >= 1")
        if replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {replicas}")
        names = [m.name for m in members]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate member names in ring: {sorted(names)}")
        self.epoch = epoch
        self.members: tuple[RingMember, ...] = tuple(sorted(members, key=lambda m: m.name))
        self.vnodes = vnodes
        self.weight_unit = weight_unit
        #: Copies of each entry wanted; a ring with fewer members holds fewer.
        self.replicas = replicas
        #: prefix -> the epoch that invalidated it (namespace invalidation).
        self.invalidations: dict[str, int] = dict(invalidations or {})
        self._replica_cache: dict[str, tuple[RingMember, ...]] = {}
        self._by_name = {m.name: m for m in self.members}
        self._owner_cache: dict[str, RingMember] = {}
        self._ring = HashRing(
            nodes={
                m.name: {"instance": m, "weight": self.weight(m), "vnodes": vnodes}
                for m in self.members
            },
            hash_fn=hash_fn,
        )

    def weight(self, member: RingMember) -> int:
        return max(1, round(member.capacity / self.weight_unit))

    def __len__(self) -> int:
        return len(self.members)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def member(self, name: str) -> RingMember | None:
        return self._by_name.get(name)

    def owner(self, key: str) -> RingMember:
        """The member that owns ``key``."""
        member = self._owner_cache.get(key)
        if member is None:
            if not self.members:
                raise Unavailable(f"the ring (epoch {self.epoch}) has no nodes")
            member = self._ring.get(key)["instance"]
            if len(self._owner_cache) >= _OWNER_CACHE_SIZE:
                self._owner_cache.clear()  # bounded; a snapshot is immutable
            self._owner_cache[key] = member
        return member

    def owners(self, key: str, n: int) -> list[RingMember]:
        """The first ``n`` distinct members clockwise from ``key`` (replica set)."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if n == 0:
            return []  # uhashring's range() reads size=0 as "all"
        if not self.members:
            raise Unavailable(f"the ring (epoch {self.epoch}) has no nodes")
        return [conf["instance"] for conf in self._ring.range(key, size=min(n, len(self.members)))]

    def replica_set(self, key: str) -> tuple[RingMember, ...]:
        """The ``replicas`` members that hold ``key``, primary (= ``owner``) first."""
        found = self._replica_cache.get(key)
        if found is None:
            primary = self.owner(key)
            if self.replicas == 1:
                found = (primary,)
            else:
                rest = [m for m in self.owners(key, self.replicas + 1) if m != primary]
                found = (primary, *rest[: self.replicas - 1])
            if len(self._replica_cache) >= _OWNER_CACHE_SIZE:
                self._replica_cache.clear()
            self._replica_cache[key] = found
        return found

    def invalidated_before(self, key: str) -> int:
        """The newest invalidation epoch of this ring's table covering ``key`` (0: none)."""
        return invalidated_before(self.invalidations, key)

    def __repr__(self) -> str:
        return f"Ring(epoch={self.epoch}, members={[m.name for m in self.members]})"
