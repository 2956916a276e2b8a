"""Namespace pins: ``Client.pin(prefix)`` / ``unpin(prefix)`` on every node.

A pin is a node-side rule (node/pins.py): pinned entries are never evicted,
within each node's pinned quota. A namespace pin asks every node of the ring
to pin what it holds under the prefix; each node does it all or nothing. It
is not atomic across nodes: a node without room refuses (CapacityExceeded,
naming it) while others may have pinned their part; ``unpin(prefix)`` undoes
that. Nodes are asked with epoch 0 (like an admin tool): a pin is not placed
with the ring, it covers whatever each node holds.
"""

from __future__ import annotations

from concurrent.futures import Executor
from dataclasses import dataclass

from tensorcache.client.nodes import NodeTransport
from tensorcache.client.placement import Placement
from tensorcache.errors import InvalidArgument, TensorCacheError
from tensorcache.proto import tensorcache_pb2 as pb
from tensorcache.ring import RingMember


@dataclass(frozen=True)
class PinResult:
    """What a namespace pin or unpin changed, summed over the nodes."""

    entries: int  # entries (tensors and stripes, every copy) whose pin state changed
    bytes: int  # their bytes as charged against the nodes' budgets


def check_prefix(prefix: object) -> str:
    if not isinstance(prefix, str):
        raise InvalidArgument(f"prefix must be a str, got {type(prefix).__name__}")
    if "\x00" in prefix or len(prefix.encode("utf-8", "surrogatepass")) > 1024:
        raise InvalidArgument("prefix must be at most 1024 UTF-8 bytes with no NUL")
    return prefix


def pin_all(
    placement: Placement,
    nodes: NodeTransport,
    pool: Executor,
    prefix: str,
    *,
    unpin: bool,
    timeout_s: float,
) -> PinResult:
    """Pin (or unpin) ``prefix`` on every node of the newest ring."""
    ring = placement.refresh(placement.current())
    request = pb.PinRequest(epoch=0, prefix=check_prefix(prefix), unpin=unpin)

    def one(member: RingMember) -> pb.PinReply | TensorCacheError:
        try:
            return nodes.pin(member, request, timeout_s)
        except TensorCacheError as exc:
            return exc

    replies = list(pool.map(one, ring.members))
    for reply in replies:
        if isinstance(reply, TensorCacheError):
            raise reply  # names its node; the others did their part (see above)
    ok = [r for r in replies if isinstance(r, pb.PinReply)]
    return PinResult(sum(r.entries for r in ok), sum(r.bytes for r in ok))
