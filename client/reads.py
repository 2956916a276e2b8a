"""The client's read path: near-cache, owners with failover, replica confirmation, stripes.

``Client.get``/``get_many``/``version``/``versions`` (client/api.py) check
their arguments and choose what to return (client/present.py); everything
between the arguments and the stored arrays is here, in one object the
client builds once. What it returns for each key is the stored form:
``(array or None, version, logical dtype)``, decompressed
(client/compress.py) and reassembled from stripes (client/striping.py).

The near-cache (client/nearcache.py) is consulted first when there is one:
a copy is served only once the owner confirms its version, or without a
check while the watch stream is live (``live()``: docs/consistency.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import numpy as np

from tensorcache import codec
from tensorcache.client import compress, nearmany, striping
from tensorcache.client.fanout import Count, FanOut
from tensorcache.client.items import GetItem
from tensorcache.client.nearcache import NearCache
from tensorcache.client.nodes import NodeTransport
from tensorcache.client.placement import Placement
from tensorcache.keys import encode_key
from tensorcache.proto import tensorcache_pb2 as pb
from tensorcache.ring import RingMember

#: What a read gives for a key: (stored array or None, version, logical dtype).
Got = tuple[np.ndarray | None, int, str]
Call = Callable[[RingMember, int, list[GetItem]], None]


class Reads:
    """Reads over the client's seams (fan-out, placement, node transport, near-cache)."""

    def __init__(
        self,
        fan: FanOut,
        placement: Placement,
        nodes: NodeTransport,
        near: NearCache | None,
        live: Callable[[], bool],
        count: Count,
    ) -> None:
        self._fan = fan
        self._placement = placement
        self._nodes = nodes
        self._near = near
        self._live = live  # the watch stream vouches for near-cache copies now
        self._count = count

    def replicas(self) -> int:
        """Copies the cluster keeps of each entry (RingSnapshot.replicas)."""
        return self._placement.current().replicas

    def read(self, items: list[GetItem], call: Call | None = None) -> None:
        """Get ``items`` from their primaries (failing over when unreachable).

        With R >= 2 a miss at the primary is confirmed at the next replica: a
        primary that has just joined or restarted may not hold its copy yet
        (re-replication and handoff fill it within milliseconds, but a read
        can come first). The replica holds every completed put too (writes go
        to all replicas), so its answer is as fresh as the primary's. Costs
        one more round trip per miss, only with replication.
        """
        call = call or self._nodes.get
        self._fan.scatter(items, call, failover=True)
        if self.replicas() < 2:
            return
        missed = [it for it in items if not it.found and it.replica == 0]
        if missed:
            for it in missed:
                it.replica = 1
            self._fan.scatter(missed, call)
            found = sum(it.found for it in missed)
            self._count("misses_confirmed", len(missed), replica_hits=found)

    def version(self, key: str) -> int | None:
        """The current version of ``key``, or None if absent (no bytes move)."""
        encode_key(key)
        items = [GetItem(key, pb.TENSOR)]
        self.read(items, self._nodes.head)
        return items[0].version if items[0].found else None

    def versions(self, keys: Iterable[str]) -> dict[str, int | None]:
        """``version`` of many keys at once: one head-only RPC per node and batch."""
        items = [GetItem(key, pb.TENSOR) for key in dict.fromkeys(keys)]
        for it in items:
            encode_key(it.key)
        if items:
            self.read(items, self._nodes.head)
        return {it.key: it.version if it.found else None for it in items}

    # ------------------------------------------------------------ one key
    def host(self, key: str, dest: np.ndarray | codec.OutView | None) -> Got:
        """``key`` into host memory (into ``dest`` when given), near-cache first."""
        hit = self._near_get(key, dest) if self._near is not None else None
        if hit is not None:
            return hit
        seq = self._near.seq if self._near is not None else 0
        array, version, logical = self._one(key, dest)
        if self._near is not None:
            if array is None:
                self._near.drop(key)
            else:
                self._near.store(key, array, version, seq, logical)
        return array, version, logical

    def _near_get(
        self, key: str, out: np.ndarray | codec.OutView | None
    ) -> tuple[np.ndarray, int, str] | None:
        """A near-cache hit still current on the owner, copied out; else None."""
        assert self._near is not None
        near = self._near.lookup(key)
        if near is None:
            self._count("near_misses")
            return None
        if self._live():
            current: int | None = near.version  # the event stream would have dropped it
        else:
            current = self.version(key)
        if current != near.version:
            self._near.drop(key)
            self._count("near_stale")
            return None
        self._count("near_hits")
        if out is None:
            return near.array.copy(order="K"), near.version, near.logical
        layout, _ = codec.encode(near.array)  # the cached copy is contiguous: no copy
        layout = dataclasses.replace(layout, logical=near.logical)
        codec.view_for(out, layout)  # same checks as a get into out=
        dest = out.array if isinstance(out, codec.OutView) else out
        np.copyto(dest, near.array)
        return dest, near.version, near.logical

    def _one(self, key: str, dest: np.ndarray | codec.OutView | None) -> Got:
        """``many`` of one key, without its dicts and lists (#18: per-call cost).

        A striped tensor (a manifest came back) takes ``many``, which reads
        the manifest again: one small round trip more next to >= 8 MiB.
        """
        encode_key(key)
        it = GetItem(key, pb.TENSOR, out=dest)
        self.read([it])
        if it.found and it.meta is not None and it.meta.stripes:
            return self.many([key], {key: dest} if dest is not None else None)[key]
        if not it.found:
            self._count("gets", hits=0, misses=1, bytes_got=0)
            return None, 0, ""
        array, version, logical = compress.restored(it)
        got = array.nbytes if array is not None else 0
        self._count("gets", hits=int(array is not None), misses=int(array is None), bytes_got=got)
        return array, version, logical

    # ------------------------------------------------------------ many keys
    def many_near(self, keys: Iterable[str]) -> dict[str, Got]:
        """``many`` through the near-cache: hits revalidated in one batch per node."""
        if self._near is None:
            return self.many(keys, None)
        wanted = list(dict.fromkeys(keys))
        for key in wanted:
            encode_key(key)
        hits = nearmany.current(
            self._near, wanted, live=self._live(), versions=self.versions, count=self._count
        )
        seq = self._near.seq  # before the fetch: see NearCache.store
        got = self.many([k for k in wanted if k not in hits], None)
        for key, (array, version, logical) in got.items():
            if array is None:
                self._near.drop(key)
            else:
                self._near.store(key, array, version, seq, logical)
        return {
            k: (hits[k].array.copy(order="K"), hits[k].version, hits[k].logical)
            if k in hits
            else got[k]
            for k in wanted
        }

    def many(
        self, keys: Iterable[str], outs: dict[str, np.ndarray | codec.OutView] | None
    ) -> dict[str, Got]:
        """key -> (array or None, version, logical dtype) for every key."""
        wanted = list(dict.fromkeys(keys))
        for key in wanted:
            encode_key(key)
        out: dict[str, Got] = dict.fromkeys(wanted, (None, 0, ""))
        pending = wanted
        # A stripe can vanish under a reader when a newer put replaced it;
        # read the manifest again (bounded) before calling it a miss.
        for _ in range(3):
            items = [GetItem(k, pb.TENSOR, out=outs.get(k) if outs else None) for k in pending]
            self.read(items)
            striped = [it for it in items if it.found and it.meta is not None and it.meta.stripes]
            for it in items:
                if it.found and it not in striped:
                    out[it.key] = compress.restored(it)
            pending = []
            if striped:
                for it, ok in zip(
                    striped, striping.fetch(striped, self.read, self._count), strict=True
                ):
                    if ok:
                        out[it.key] = compress.restored(it)
                    else:
                        pending.append(it.key)
            if not pending:
                break
            self._count("stripe_retries", len(pending))
        hits = sum(a is not None for a, _, _ in out.values())
        got = sum(a.nbytes for a, _, _ in out.values() if a is not None)
        self._count("gets", len(out), hits=hits, misses=len(out) - hits, bytes_got=got)
        return out
