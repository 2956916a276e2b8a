"""SIGTERM drain: a leaving node hands its entries to their new owners.

After deregistering (clients stop sending here), the node pushes every entry
it owns to the key's replica set in the ring without it, most recently used
first, as versioned writes carrying the entry's version and stamp: a target
that meanwhile took a newer put keeps it (docs/consistency.md, "Warm
rebalance"). One thread per target, all within one time bound; whatever is
left when it runs out is lost, as with a crash (a miss, never a stale
value). Entries of large tensors are independent keys (the manifest and each
stripe), so their order does not matter.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

from tensorcache.errors import CapacityExceeded, TensorCacheError
from tensorcache.node.payload import payload_chunks
from tensorcache.node.peers import Peers
from tensorcache.node.store import Entry
from tensorcache.proto import tensorcache_pb2 as pb
from tensorcache.router.ring import Ring

log = logging.getLogger("tensorcache.node")

BATCH_ENTRIES = 256
BATCH_BYTES = 16 * 1024 * 1024
CALL_TIMEOUT_S = 5.0


def _batches(entries: list[Entry]) -> Iterator[list[Entry]]:
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


def push(
    peers: Peers, address: str, entries: list[Entry], deadline: float, *, what: str = "drain"
) -> int:
    """Push ``entries`` to one node in batches until done or ``deadline``; returns how many."""
    done = 0
    for batch in _batches(entries):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        req = pb.PutRequest(
            epoch=0,  # a handoff write: placed by the sender's ring, not the target's
            entries=[
                pb.EntryPut(
                    key=e.key[1].encode(),
                    kind=e.key[0],
                    meta=e.meta,
                    version=e.version,
                    stamp=e.stamp,
                )
                for e in batch
            ],
        )
        payload = (c if isinstance(c, bytes) else bytes(c) for c in payload_chunks(batch))
        try:
            reply = peers.put(address, req, payload, min(CALL_TIMEOUT_S, left))
        except CapacityExceeded as exc:
            log.warning("%s: %s has no room for %d entries: %s", what, address, len(batch), exc)
            continue
        except TensorCacheError as exc:
            log.warning("%s: %s failed, giving up on it: %s", what, address, exc)
            break
        done += len(reply.results)
    return done


def drain(entries: list[Entry], ring: Ring, me: str, peers: Peers, timeout_s: float) -> int:
    """Push ``entries`` (hottest first) to their replica sets in ``ring``; returns copies made."""
    if not ring.members or timeout_s <= 0:
        return 0
    deadline = time.monotonic() + timeout_s
    queues: dict[str, list[Entry]] = {}
    for entry in entries:
        for member in ring.replica_set(entry.key[1]):
            if member.name != me:
                queues.setdefault(member.address, []).append(entry)
    counts: dict[str, int] = {}

    def run(address: str, queue: list[Entry]) -> None:
        try:
            counts[address] = push(peers, address, queue, deadline)
        except Exception:  # a bug must not keep the process from exiting
            log.exception("drain to %s failed", address)

    threads = [
        threading.Thread(target=run, args=(a, q), name="drain", daemon=True)
        for a, q in queues.items()
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()) + 1.0)
    return sum(counts.values())
