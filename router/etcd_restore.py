"""After an etcd restore: move etcd's revision, and so the epoch, past every epoch seen.

Why it is needed. Epochs are etcd revisions (router/etcd_membership.py).
``etcdctl snapshot restore`` brings back the keyspace *and its revision* as
of the snapshot, so every change made after the snapshot took a revision
that etcd will hand out again. Nodes only ever adopt a newer epoch
(node/agent.py) and refuse requests placed with an older one, so after a
restore from anything but the very last revision:

* every client request fails with ``StaleEpoch`` (the router's ring is
  older than the nodes'), until enough changes happen to catch up;
* worse, an invalidation made meanwhile is recorded at a revision the nodes
  count as old: they never adopt the ring that carries it, ``invalidate``
  returns as if it had worked (every node is "at or past" its epoch), and
  entries stamped at the higher epochs of before the restore stay visible.

A newer etcdutl (3.6, late 3.5 releases) can do this at restore time
(``etcdutl snapshot restore --bump-revision N --mark-compacted``); 3.4,
Debian's etcd, cannot. This
does it on a running etcd, before or after routers start: it writes a
scratch key *beside* the watched prefix (``<prefix>-restore``, so no router
sees a membership change) until etcd's revision is past ``past``, deletes
it, and raises ring-epoch to the last revision written with the routers'
own transaction. Every router watching then publishes its view at that
epoch, above every epoch seen, and nodes adopt it at their next heartbeat.

A write is one revision, so the cost is ``past - revision`` writes, sent
in batches of concurrent puts (thousands a second on one etcd); it is
bounded by ``max_writes``.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from tensorcache.router.etcd_auth import EtcdAuth
from tensorcache.router.etcd_conn import EtcdConnection
from tensorcache.router.etcd_health import EtcdHealth
from tensorcache.router.etcd_records import DEFAULT_PREFIX, EtcdKeys
from tensorcache.router.etcd_watch import raise_epoch

log = logging.getLogger("tensorcache.router")

#: Puts in flight at once while advancing (one etcd round trip per batch).
BATCH = 256
#: Default bound on the writes one advance may make.
MAX_WRITES = 10_000_000


@dataclass(frozen=True)
class Advanced:
    """What ``advance`` did: etcd's revision before, the epoch it set, writes made."""

    revision_before: int
    epoch: int
    writes: int


def advance(
    url: str,
    past: int,
    *,
    prefix: str = DEFAULT_PREFIX,
    timeout_s: float = 30.0,
    auth: EtcdAuth | None = None,
    max_writes: int = MAX_WRITES,
) -> Advanced:
    """Move etcd's revision past ``past`` and raise ring-epoch to it (see the module doc)."""
    if past < 0:
        raise ValueError(f"past must be >= 0, got {past}")
    if max_writes < 1:
        raise ValueError(f"max_writes must be >= 1, got {max_writes}")
    keys = EtcdKeys.under(prefix)
    scratch = prefix.rstrip("/").encode() + b"-restore"
    conn = EtcdConnection(url, timeout_s=timeout_s, health=EtcdHealth(url), auth=auth)
    try:
        first = conn.submit(_puts(conn, scratch, 1), "advance: first write")
        before, revision, writes = first - 1, first, 1
        if past - revision > max_writes:
            conn.submit(conn.client.delete(scratch), "advance: delete the scratch key")
            raise ValueError(
                f"etcd {url} is at revision {revision}; reaching {past + 1} takes "
                f"{past - revision + 1} writes, more than max_writes={max_writes}"
            )
        while revision <= past:
            n = min(BATCH, past + 1 - revision)
            revision = max(revision, conn.submit(_puts(conn, scratch, n), "advance: writes"))
            writes += n
        conn.submit(conn.client.delete(scratch), "advance: delete the scratch key")
        conn.submit(raise_epoch(conn.client, keys, revision), "advance: raise ring-epoch")
    finally:
        conn.close()
    log.info(
        "etcd %s advanced from revision %d to epoch %d (%d writes)", url, before, revision, writes
    )
    return Advanced(before, revision, writes)


async def _puts(conn: EtcdConnection, key: bytes, n: int) -> int:
    """``n`` concurrent puts of ``key``; the highest revision they were written at."""
    client = conn.client
    replies = await asyncio.gather(*(client.put(key, b"") for _ in range(n)))
    return max(int(r.header.revision) for r in replies)
