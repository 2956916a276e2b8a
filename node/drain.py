"""Pushing copies to other nodes: the one primitive of drain and re-replication.

A push is a versioned handoff write (``PutRequest.epoch`` 0, each entry with
its version and stamp): the target keeps a newer value it took meanwhile and
ignores a copy of a key written or deleted there since its last ring change
(node/ops.py), so a push never resurrects or rolls back anything, and the
same push twice is harmless. The reply says, per entry, what the target
holds now; a copy is *confirmed* when the target holds that version or a
newer truth (``kept_newer``). Confirmations feed each entry's holders
(node/store.py), which is how a node knows when a key has reached every
member of its replica set (node/rebalance.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence

from tensorcache.errors import CapacityExceeded, TensorCacheError
from tensorcache.node.payload import payload_chunks
from tensorcache.node.peers import Peers
from tensorcache.node.store import Entry
from tensorcache.proto import tensorcache_pb2 as pb

log = logging.getLogger("tensorcache.node")

BATCH_ENTRIES = 256
BATCH_BYTES = 16 * 1024 * 1024
CALL_TIMEOUT_S = 5.0


def batches(entries: Sequence[Entry]) -> Iterator[list[Entry]]:
    batch: list[Entry] = []
    nbytes = 0
    for entry in entries:
        size = sum(len(c) for c in entry.chunks)
        if batch and (len(batch) >= BATCH_ENTRIES or nbytes + size > BATCH_BYTES):
            yield batch
            batch, nbytes = [], 0
        batch.append(entry)
        nbytes += size
    if batch:
        yield batch


class TargetFailed(Exception):
    """A push target did not answer (down, leaving, partitioned): skip it for now."""


def push_batch(peers: Peers, address: str, batch: list[Entry], timeout_s: float) -> list[Entry]:
    """Push one batch to one node; return the entries it confirmed.

    Raises TargetFailed when the node cannot take pushes now (unreachable or
    leaving); a node out of room confirms nothing of this batch.
    """
    req = pb.PutRequest(epoch=0)  # a handoff write: placed by the sender's ring
    for e in batch:
        put = req.entries.add(
            key=e.key[1].encode(), kind=e.key[0], version=e.version, stamp=e.stamp
        )
        put.meta.MergeFromString(e.meta)  # stored serialized (node/validate.py tensor_meta)
    payload = (c if isinstance(c, bytes) else bytes(c) for c in payload_chunks(batch))
    try:
        reply = peers.put(address, req, payload, timeout_s)
    except CapacityExceeded as exc:
        log.warning("push: %s has no room for %d entries: %s", address, len(batch), exc)
        return []
    except TensorCacheError as exc:
        raise TargetFailed(f"{address}: {exc}") from exc
    if len(reply.results) != len(batch):
        log.warning("push: %s answered %d of %d entries", address, len(reply.results), len(batch))
        return []
    return [
        e
        for e, r in zip(batch, reply.results, strict=True)
        if r.kept_newer or r.version >= e.version
    ]


def push(
    peers: Peers, address: str, entries: list[Entry], deadline: float, *, what: str = "drain"
) -> int:
    """Push ``entries`` to one node in batches until done or ``deadline``; returns how many."""
    done = 0
    for batch in batches(entries):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            done += len(push_batch(peers, address, batch, min(CALL_TIMEOUT_S, left)))
        except TargetFailed as exc:
            log.warning("%s: giving up on %s", what, exc)
            break
    return done
