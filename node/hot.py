"""The hottest keys a node holds: what an operator exports to re-warm a cluster.

``tensorcache hot`` asks every node for its most recently used tensor keys
(``StatRequest.hot_keys``) and writes them out; ``tensorcache warm --keys``
loads those keys into another cluster. The store is walked a chunk at a time
(``Store.judge``: the lock is held briefly, and each entry is judged as
any read would, so hidden, demoted and invalidated entries are left out);
ranking happens outside the lock.
"""

from __future__ import annotations

import heapq

from tensorcache.node.store import Entry, Store
from tensorcache.proto import tensorcache_pb2 as pb

CHUNK = 256
MAX_HOT_KEYS = 100_000  # per node and request: a reply stays a few MiB


def hot_keys(store: Store, limit: int, out: pb.NodeStats) -> None:
    """Add up to ``limit`` visible tensor keys, most recently used first, to ``out.hot``."""
    limit = min(limit, MAX_HOT_KEYS)
    keys = [k for k in store.keys() if k[0] == pb.TENSOR]  # noqa: SIM118  # a Store, not a dict
    best: list[tuple[int, int, Entry]] = []  # (used, tiebreak, entry): a bounded min-heap
    for i in range(0, len(keys), CHUNK):
        for entry in store.judge(keys[i : i + CHUNK]):
            if entry.demoted:
                continue
            item = (entry.used, i, entry)
            if len(best) < limit:
                heapq.heappush(best, item)
            elif item[0] > best[0][0]:
                heapq.heapreplace(best, item)
    for _, _, entry in sorted(best, key=lambda t: t[0], reverse=True):
        meta = pb.TensorMeta.FromString(entry.meta)
        out.hot.add(key=entry.key[1].encode(), nbytes=meta.nbytes, version=entry.version)
