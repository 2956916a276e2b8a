"""Fencing every node to an epoch: what makes ``Client.invalidate`` take effect at once.

An invalidation is a new ring epoch E. Nodes learn epochs from their
heartbeats, up to an interval late; until a node knows E it would still
serve the values E hides. So before ``invalidate`` returns, the client waits
until its router publishes a ring at E or later and then asks every node of
that ring to bring itself up to E (``Node.Fence``: the node fetches the ring
from its router). A node that cannot be reached at all is dead and serves
nothing; one that answers but cannot reach E fails the call.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Executor

from tensorcache.client.nodes import NodeTransport
from tensorcache.client.placement import Placement
from tensorcache.errors import Unavailable
from tensorcache.ring import Ring, RingMember

log = logging.getLogger("tensorcache.client")


def fence_all(
    placement: Placement,
    nodes: NodeTransport,
    pool: Executor,
    epoch: int,
    timeout: float,
    what: str,
) -> Ring:
    """Bring every node of the ring (as of ``epoch`` or later) up to ``epoch``."""
    deadline = time.monotonic() + timeout
    ring = placement.current()
    while ring.epoch < epoch:
        ring = placement.refresh(ring, epoch)
        if ring.epoch >= epoch:
            break
        if time.monotonic() > deadline:
            raise Unavailable(f"{what}: the router is still at epoch {ring.epoch} < {epoch}")
        time.sleep(0.02)

    def fence(member: RingMember) -> int | None:
        got = nodes.fence(member, epoch, max(0.1, deadline - time.monotonic()))
        if got is None:
            log.info("%s: node %s unreachable, presumed dead", what, member.name)
        return got

    for member, got in zip(ring.members, pool.map(fence, ring.members), strict=True):
        if got is not None and got < epoch:
            raise Unavailable(
                f"{what}: node {member.name} is at epoch {got}, could not reach {epoch}"
            )
    return ring
