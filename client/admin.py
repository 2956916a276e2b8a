"""Whole-cluster requests behind ``Client.stats``, ``hot_keys`` and ``invalidate``.

Unlike reads and writes, which go to the owners of keys, each of these asks
every node of the newest ring (the ring is refreshed first, so a node that
just joined is counted). They are what the operator tools use
(``tensorcache stats``, ``tensorcache hot``, ``tensorcache invalidate``).
Namespace pins, the other whole-cluster request, are in client/pins.py.

An unreachable node is reported as such by ``stats`` and contributes no keys
to ``hot_keys``: both are for looking at a cluster, and a dead node must not
hide the live ones. ``invalidate`` is different: it must take effect
everywhere before it returns (client/fence.py).
"""

from __future__ import annotations

from concurrent.futures import Executor

from tensorcache import wire
from tensorcache.client.config import NodeStats
from tensorcache.client.fence import fence_all
from tensorcache.client.nodes import NodeTransport
from tensorcache.client.pins import check_prefix
from tensorcache.client.placement import Placement
from tensorcache.client.transport import RouterTransport
from tensorcache.errors import InvalidArgument, TensorCacheError
from tensorcache.proto import tensorcache_pb2 as pb
from tensorcache.ring import RingMember

#: The most keys ``hot_keys`` returns (and each node is asked for).
MAX_HOT_KEYS = 100_000


def stats(
    placement: Placement, nodes: NodeTransport, pool: Executor, timeout_s: float
) -> list[NodeStats]:
    """One record per node in the ring (unreachable nodes: reachable=False)."""
    ring = placement.refresh(placement.current())

    def one(member: RingMember) -> NodeStats:
        try:
            return wire.node_stats(nodes.stat(member, timeout_s))
        except TensorCacheError:
            return wire.unreachable(member)

    return list(pool.map(one, ring.members))


def hot_keys(
    placement: Placement, nodes: NodeTransport, pool: Executor, timeout_s: float, limit: int
) -> list[tuple[str, int]]:
    """Up to ``limit`` of the cluster's most recently used keys, merged rank by rank."""
    if not isinstance(limit, int) or not 0 < limit <= MAX_HOT_KEYS:
        raise InvalidArgument(f"limit must be an int in 1..100000, got {limit!r}")
    ring = placement.refresh(placement.current())
    request = pb.StatRequest(hot_keys=limit)

    def one(member: RingMember) -> list[pb.HotKey]:
        try:
            return list(nodes.stat(member, timeout_s, request).hot)
        except TensorCacheError:
            return []

    lists = list(pool.map(one, ring.members))
    out: dict[str, int] = {}
    for rank in range(max((len(x) for x in lists), default=0)):
        for hot in lists:
            if rank < len(hot) and len(out) < limit:
                out.setdefault(hot[rank].key.decode(), hot[rank].nbytes)
    return list(out.items())


def invalidate(
    control: RouterTransport,
    placement: Placement,
    nodes: NodeTransport,
    pool: Executor,
    prefix: str,
    timeout_s: float,
) -> int:
    """Record the invalidation of ``prefix`` at the router, then fence every node to it.

    Returns the new generation (the ring epoch the router recorded it under).
    """
    check_prefix(prefix)
    generation = control.invalidate(prefix, timeout_s)
    fence_all(placement, nodes, pool, generation, timeout_s, f"invalidate {prefix!r}")
    return generation
