"""The client a worker imports: ``tensorcache.connect(router) -> Client``.

This module holds the public methods only; the parts live beside it:
striping (client/striping.py), the fan-out with its retry and failover
policy (client/fanout.py), the node transport seam and its network
implementation (client/nodes.py), placement (client/placement.py), the
near-cache (client/nearcache.py, client/watch.py), read-through fills
(client/fill.py) and the work items with their wire mapping
(client/items.py). ``tensorcache.testing`` provides an in-memory cluster
behind the same seams.

Concurrency: a ``Client`` is thread-safe. Fan-out RPCs run on one thread
pool; a public call submits tasks and waits, tasks never submit tasks, so the
pool cannot deadlock. gRPC channels do not survive ``fork()``: connect in
each process.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from tensorcache import codec, wire
from tensorcache.auth import TOKEN_ENV
from tensorcache.authgrpc import Credentials
from tensorcache.client import compress, nearmany, present, striping
from tensorcache.client.config import ClientConfig, NodeStats
from tensorcache.client.fanout import FanOut
from tensorcache.client.fence import fence_all
from tensorcache.client.fill import FillOptions, RpcGrants, read_through, store_if_absent
from tensorcache.client.items import DelItem, FillItem, GetItem, PutItem
from tensorcache.client.metrics import timed
from tensorcache.client.nearcache import NearCache
from tensorcache.client.nodes import NetworkTransport, NodeTransport
from tensorcache.client.pins import PinResult, pin_all
from tensorcache.client.placement import Placement
from tensorcache.client.prefetch import Prefetcher
from tensorcache.client.transport import RouterConn, RouterTransport
from tensorcache.client.watch import EventWatcher
from tensorcache.errors import InvalidArgument, TensorCacheError
from tensorcache.keys import encode_key
from tensorcache.metrics import Recorder
from tensorcache.proto import tensorcache_pb2 as pb
from tensorcache.ring import RingMember
from tensorcache.sizes import parse_size
from tensorcache.tls import TLSFiles

if TYPE_CHECKING:
    from tensorcache.kv.cache import KVCache
    from tensorcache.kv.layout import KVLayout

log = logging.getLogger("tensorcache.client")

__all__ = ["Client", "ClientConfig", "NodeStats", "connect"]

T = TypeVar("T")


class Client:
    """A connection to a tensorcache cluster. Use ``tensorcache.connect``.

    ``nodes`` and ``control`` are the seams to the cluster (client/nodes.py,
    client/transport.py): by default the network, to the router at
    ``router``; ``tensorcache.testing.FakeCluster`` passes in-memory ones.
    """

    def __init__(
        self,
        router: str,
        config: ClientConfig | None = None,
        *,
        nodes: NodeTransport | None = None,
        control: RouterTransport | None = None,
    ) -> None:
        self.config = config or ClientConfig()
        self._mlock = threading.Lock()
        self._metrics: dict[str, int] = defaultdict(int)
        # Call latencies for Prometheus (client/metrics.py); None: not timed.
        self._timing = Recorder() if self.config.metrics else None
        self._control: RouterTransport = (
            control
            if control is not None
            else RouterConn(router, Credentials(self.config.token, self.config.tls))
        )
        self._nodes: NodeTransport = (
            nodes if nodes is not None else NetworkTransport(self.config, self._count)
        )
        self._placement = Placement(self._control, self.config.timeout_s)
        self._pool = ThreadPoolExecutor(self.config.parallelism, thread_name_prefix="tensorcache")
        self._fan = FanOut(self._placement, self._pool, self.config, self._count)
        self._near = (
            NearCache(self.config.near_cache_bytes) if self.config.near_cache_bytes else None
        )
        self._watch: EventWatcher | None = None
        self._prefetcher = Prefetcher(self.config.parallelism)
        self._staging: dict[Any, Any] = {}  # device -> staging ring (client/staging.py)
        self._closed = False
        try:
            self._placement.current()
            if self._near is not None and self.config.near_cache_mode == "watch":
                if not isinstance(self._control, RouterConn):
                    raise InvalidArgument("near_cache_mode='watch' needs a router's event stream")
                self._watch = EventWatcher(self._control, self._near)
        except TensorCacheError:
            self.close()
            raise

    # ------------------------------------------------------------ lifecycle
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._watch is not None:
            self._watch.close()
        self._prefetcher.close()  # its gets wait on the pool: before the pool
        self._pool.shutdown(wait=True)
        self._nodes.close()
        self._control.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def epoch(self) -> int:
        """Epoch of the ring snapshot this client currently places keys with."""
        return self._placement.current().epoch

    @property
    def stripe_size(self) -> int:
        return self.config.stripe_size or self._placement.stripe_size or 8 * 1024 * 1024

    def metrics(self) -> dict[str, int]:
        """Client-side counters: gets, hits, misses, puts, retries, ring_refreshes, …"""
        with self._mlock:
            out = dict(self._metrics)
        out["ring_refreshes"] = self._placement.refreshes
        if self._near is not None:
            out["near_bytes"] = self._near.bytes_used
            out["near_dropped_by_events"] = self._near.dropped_by_events
        if self._watch is not None:
            out["watch_events"] = self._watch.events
            out["watch_reconnects"] = self._watch.reconnects
            # 1/0: the stream is up; its last message said complete; hits
            # are being served without asking the owner (docs/consistency.md).
            out["watch_connected"] = int(self._watch.connected)
            out["watch_complete"] = int(self._watch.complete)
            out["watch_live"] = int(self._watch.live)
        return out

    def _count(self, name: str, n: int = 1, **more: int) -> None:
        with self._mlock:
            self._metrics[name] += n
            for k, v in more.items():
                self._metrics[k] += v

    # ------------------------------------------------------------ public API
    @timed("put")
    def put(
        self,
        key: str,
        value: Any,
        *,
        if_version: int | None = None,
        compression: str | None = None,
        pin: bool = False,
    ) -> int:
        """Store ``value`` (numpy array or torch tensor) under ``key``; returns its new version.

        ``if_version``: store only if the key's current version is this one
        (0: only if absent), checked atomically on the owner node; otherwise
        raise ``VersionConflict`` and leave the stored value as it was.
        ``compression``: "lz4", "zstd" or "none" (default: the connection's
        per-prefix default, else none); gets decompress transparently.
        ``pin``: never evict it, within each node's pinned quota (beyond it:
        ``CapacityExceeded``); the pin belongs to this value (node/pins.py).
        """
        if if_version is not None and (not isinstance(if_version, int) or if_version < 0):
            raise InvalidArgument(f"if_version must be an int >= 0, got {if_version!r}")
        return self._put_many(
            {key: value},
            {key: if_version} if if_version is not None else None,
            compression,
            pin=pin,
        )[key]

    def pin(self, prefix: str, *, timeout_s: float | None = None) -> PinResult:
        """Pin every entry stored under ``prefix`` on every node (never evicted).

        Each node pins its part all or nothing within its pinned quota, else
        raises ``CapacityExceeded`` naming the node (others may have pinned
        theirs: ``unpin`` undoes it). Covers what is stored now, which for a
        model revision (an immutable namespace) is all of it; later puts are
        pinned with ``put(..., pin=True)``. See client/pins.py, node/pins.py.
        """
        timeout = timeout_s if timeout_s is not None else self.config.timeout_s
        return pin_all(
            self._placement, self._nodes, self._pool, prefix, unpin=False, timeout_s=timeout
        )

    def unpin(self, prefix: str, *, timeout_s: float | None = None) -> PinResult:
        """Make every entry under ``prefix`` evictable again (its bytes stay cached)."""
        timeout = timeout_s if timeout_s is not None else self.config.timeout_s
        return pin_all(
            self._placement, self._nodes, self._pool, prefix, unpin=True, timeout_s=timeout
        )

    def _near_get(
        self, key: str, out: np.ndarray | codec.OutView | None
    ) -> tuple[np.ndarray, int, str] | None:
        """A near-cache hit still current on the owner, copied out; else None."""
        assert self._near is not None
        near = self._near.lookup(key)
        if near is None:
            self._count("near_misses")
            return None
        if self._watch is not None and self._watch.live:
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

    def get_or_load(
        self,
        key: str,
        loader: Callable[[], Any],
        *,
        lease_s: float = 2.0,
        max_load_s: float | None = None,
        timeout_s: float = 600.0,
        fill_ttl_s: float | None = None,
    ) -> Any:
        """The tensor under ``key``; on a miss, load it with ``loader()`` and put it.

        One caller cluster-wide loads; the others wait and read what it put.
        Its grant is a lease of ``lease_s`` renewed while ``loader`` runs, so a
        filler that dies or is cut off is replaced within about ``lease_s``; a
        loader that raises hands it over at once (the error propagates).
        ``max_load_s``: stop renewing then (a hung loader is replaced; it is
        not interrupted). Waiters raise ``Unavailable`` naming the filler after
        ``timeout_s``. ``fill_ttl_s`` is refused. Details: client/fill.py.
        """
        if fill_ttl_s is not None:
            raise InvalidArgument(
                "get_or_load(fill_ttl_s=...) is gone: the fill grant is a lease renewed while "
                "the loader runs; use lease_s (default 2 s) and, to bound a hung loader, max_load_s"
            )
        encode_key(key)
        return read_through(
            key,
            lookup=lambda: self.get(key),
            load=loader,
            store=store_if_absent(lambda v: self.put(key, v, if_version=0), key, self._count),
            grants=RpcGrants(self._fill),
            options=FillOptions(lease_s=lease_s, max_load_s=max_load_s, timeout_s=timeout_s),
            count=self._count,
        )

    def fill_once(
        self,
        key: str,
        *,
        lookup: Callable[[], T | None],
        load: Callable[[], T],
        store: Callable[[T], None],
        lease_s: float = 2.0,
        max_load_s: float | None = None,
        timeout_s: float = 600.0,
    ) -> T:
        """``get_or_load`` for a value made of many keys (a state dict, a KV prefix).

        ``lookup()`` if it finds something (not None); else exactly one caller
        cluster-wide, holding the fill grant of ``key``, runs ``load()`` then
        ``store(value)``; the grant ends when a put of ``key`` commits, so
        ``store`` must put ``key`` last (its commit point) and should put it
        conditionally on absence. The others wait, then ``lookup()`` again.
        Options as for ``get_or_load``; details in client/fill.py.
        """
        encode_key(key)
        return read_through(
            key,
            lookup=lookup,
            load=load,
            store=store,
            grants=RpcGrants(self._fill),
            options=FillOptions(lease_s=lease_s, max_load_s=max_load_s, timeout_s=timeout_s),
            count=self._count,
        )

    def _fill(
        self, key: str, holder: str, filler: str, ttl_ms: int, *, release: bool, timeout_s: float
    ) -> pb.FillReply:
        items = [FillItem(key, holder, filler, ttl_ms, release, timeout_s)]
        self._fan.scatter(items, self._nodes.fill)
        assert items[0].reply is not None
        return items[0].reply

    def version(self, key: str) -> int | None:
        """The current version of ``key``, or None if absent (no bytes move)."""
        encode_key(key)
        items = [GetItem(key, pb.TENSOR)]
        self._read(items, self._nodes.head)
        return items[0].version if items[0].found else None

    def versions(self, keys: Iterable[str]) -> dict[str, int | None]:
        """``version`` of many keys at once: one head-only RPC per node and batch."""
        if isinstance(keys, str):
            raise InvalidArgument("versions takes an iterable of keys, not a single str")
        items = [GetItem(key, pb.TENSOR) for key in dict.fromkeys(keys)]
        for it in items:
            encode_key(it.key)
        if items:
            self._read(items, self._nodes.head)
        return {it.key: it.version if it.found else None for it in items}

    def kv(self, layout: KVLayout) -> KVCache:
        """The KV-cache API for one model layout (tensorcache/kv; needs torch)."""
        try:
            from tensorcache.kv.cache import KVCache
        except ModuleNotFoundError as exc:
            raise ModuleNotFoundError(
                f"client.kv() needs torch ({exc}): pip install 'tensorcache[kv]'"
            ) from exc
        return KVCache(self, layout)

    @timed("get")
    def get(
        self,
        key: str,
        *,
        out: Any = None,
        min_version: int | None = None,
        device: Any = None,
        as_: str | None = None,
    ) -> Any:
        """The tensor stored under ``key``, or None on a miss.

        numpy array or torch tensor: as written, unless ``as_`` ("numpy",
        "torch", "raw"), ``device`` ("cpu", "cuda:N") or a torch ``out`` says
        otherwise; the full rule is in client/present.py.

        ``out``: an array of the stored dtype and shape (writable, contiguous
        in the stored order) to fill instead of allocating one. Reusing a
        destination skips the page faults of fresh memory, the largest cost
        left on the co-located path. On a miss ``out`` is left as it was only
        if nothing was received; treat its contents as undefined then.

        ``min_version``: never return a value older than this version; an
        older one is reported as a miss (None).
        """
        w = present.want(as_, device, out)
        if w.cuda or (w.out is not None and present.on_cuda(w.out)):
            from tensorcache.client import torchio

            return torchio.get_cuda(self, key, w, min_version)
        dest = present.out_dest(out)
        array, version, logical = self._get_host(key, dest)
        if array is not None and min_version is not None and version < min_version:
            self._count("stale_rejected")
            return None
        return present.present(key, array, logical, w)

    def _get_host(
        self, key: str, dest: np.ndarray | codec.OutView | None
    ) -> tuple[np.ndarray | None, int, str]:
        """(stored array or None, version, logical dtype), near-cache first."""
        hit = self._near_get(key, dest) if self._near is not None else None
        if hit is not None:
            return hit
        seq = self._near.seq if self._near is not None else 0
        array, version, logical = self._get_one(key, dest)
        if self._near is not None:
            if array is None:
                self._near.drop(key)
            else:
                self._near.store(key, array, version, seq, logical)
        return array, version, logical

    def delete(self, key: str) -> bool:
        """Remove ``key``; returns whether it was present."""
        encode_key(key)
        items = [DelItem(key, pb.TENSOR, replica=i) for i in range(self._replicas())]
        self._fan.scatter(items, self._nodes.delete)
        stripes = {ref.key: ref for it in items for ref in it.stripes}
        self._free_stripes(list(stripes.values()))
        if self._near is not None:
            self._near.drop(key)
        self._count("deletes")
        return any(it.found for it in items)

    def invalidate(self, prefix: str, *, timeout_s: float | None = None) -> int:
        """Invalidate every key under ``prefix`` ("" = all); returns the new generation.

        Once this returns, no client anywhere returns a value put under
        ``prefix`` before the call: the router records (prefix, E) under a new
        ring epoch E, and every node is fenced to E (brought up to that ring)
        before this returns; nodes hide entries of the namespace committed
        under an older epoch and drop them lazily. O(1) in the number of keys.
        A node that cannot be reached is dead and serves nothing; one that
        answers but cannot reach E fails the call with ``Unavailable``.
        Watch-mode near-caches learn it by push (bounded delay, see
        docs/consistency.md); strict ones at their next revalidation.
        """
        if not isinstance(prefix, str):
            raise InvalidArgument(f"prefix must be a str, got {type(prefix).__name__}")
        if "\x00" in prefix or len(prefix.encode("utf-8", "surrogatepass")) > 1024:
            raise InvalidArgument("prefix must be at most 1024 UTF-8 bytes with no NUL")
        timeout = timeout_s if timeout_s is not None else self.config.timeout_s
        generation = self._control.invalidate(prefix, timeout)
        fence_all(
            self._placement, self._nodes, self._pool, generation, timeout, f"invalidate {prefix!r}"
        )
        if self._near is not None:
            self._near.drop_prefix(prefix)
        self._count("invalidations")
        return generation

    def _read(
        self,
        items: list[GetItem],
        call: Callable[[RingMember, int, list[GetItem]], None] | None = None,
    ) -> None:
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
        if self._replicas() < 2:
            return
        missed = [it for it in items if not it.found and it.replica == 0]
        if missed:
            for it in missed:
                it.replica = 1
            self._fan.scatter(missed, call)
            found = sum(it.found for it in missed)
            self._count("misses_confirmed", len(missed), replica_hits=found)

    def _replicas(self) -> int:
        """Copies the cluster keeps of each entry (RingSnapshot.replicas)."""
        return self._placement.current().replicas

    @timed("put_many")
    def put_many(
        self,
        values: Mapping[str, Any],
        *,
        compression: str | None = None,
        pin: bool = False,
    ) -> dict[str, int]:
        """Store several numpy arrays or torch tensors (few RPCs per node); returns versions.

        ``compression`` and ``pin``: as for ``put``, every one of them.
        """
        return self._put_many(values, None, compression, pin=pin)

    def _put_many(
        self,
        values: Mapping[str, Any],
        conditions: dict[str, int] | None,
        compression: str | None = None,
        *,
        pin: bool = False,
    ) -> dict[str, int]:
        if not isinstance(values, Mapping):
            raise InvalidArgument(
                f"put_many takes a mapping of key -> array, got {type(values).__name__}"
            )
        encoded = present.encode_values(values)
        copies = self._replicas()
        values, packed = compress.pack_many(encoded, compression, self.config.compression)
        tensors, shards = striping.plan(values, self.stripe_size, copies, conditions, pin)
        compress.describe(tensors, packed)
        present.keep_logical(tensors, packed, encoded)
        if shards:
            striping.check_fits(self._placement.current(), shards)
            try:
                self._fan.scatter(shards, self._nodes.put)  # stripes first: the manifest commits
            except TensorCacheError:
                self._free_stripes([r for it in tensors for r in it.meta.stripes])
                raise
        try:
            self._fan.scatter(tensors, self._nodes.put)  # the primary assigns each version
            if copies > 1:
                # Then every other replica stores exactly that version. The
                # put returns only once all of them have (docs/consistency.md).
                # They are placed with the ring of now, leaving out the member
                # that took the primary write: if the ring changed in between,
                # the key's new primary must get a copy too.
                self._fan.scatter(
                    [
                        PutItem(
                            it.key,
                            it.kind,
                            it.meta,
                            it.view,
                            replica=i if it.placed else i + 1,
                            exact=it.version,
                            skip=it.placed,
                        )
                        for it in tensors
                        for i in range(copies - 1)
                    ],
                    self._nodes.put,
                )
        except TensorCacheError:
            # Stripes of manifests that did not commit are unreachable: free them.
            self._free_stripes([r for it in tensors if not it.version for r in it.meta.stripes])
            raise
        self._free_stripes([ref for it in tensors for ref in it.replaced])
        if self._near is not None:
            for it in tensors:
                self._near.drop(it.key)
        self._count("puts", len(tensors), bytes_put=sum(it.meta.nbytes for it in tensors))
        return {it.key: it.version for it in tensors}

    @timed("get_many")
    def get_many(
        self, keys: Iterable[str], *, device: Any = None, as_: str | None = None
    ) -> dict[str, Any]:
        """Fetch several tensors (one RPC per node and batch); misses map to None.

        With a near-cache, hits are revalidated together: one head-only
        request per node for all of them (client/nearmany.py).

        ``device`` and ``as_`` apply to every key, as for ``get``.
        """
        if isinstance(keys, str):
            raise InvalidArgument("get_many takes an iterable of keys, not a single str")
        w = present.want(as_, device, None)
        if w.cuda:
            from tensorcache.client import torchio

            return torchio.get_many_cuda(self, list(keys), w)
        return {
            k: present.present(k, array, logical, w)
            for k, (array, _, logical) in self._get_many_near(keys).items()
        }

    def _get_many_near(self, keys: Iterable[str]) -> dict[str, tuple[np.ndarray | None, int, str]]:
        """``_get_many`` through the near-cache: hits revalidated in one batch per node."""
        if self._near is None:
            return self._get_many(keys, None)
        wanted = list(dict.fromkeys(keys))
        for key in wanted:
            encode_key(key)
        live = self._watch is not None and self._watch.live
        hits = nearmany.current(
            self._near, wanted, live=live, versions=self.versions, count=self._count
        )
        seq = self._near.seq  # before the fetch: see NearCache.store
        got = self._get_many([k for k in wanted if k not in hits], None)
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

    def prefetch(
        self, keys: Iterable[str], *, device: Any = None, as_: str | None = None
    ) -> Future[dict[str, Any]]:
        """Start ``get_many(keys, device=, as_=)`` in the background; returns its Future.

        ``result()`` gives the dict (misses: None) or raises the get's error.
        """
        if isinstance(keys, str):
            raise InvalidArgument("prefetch takes an iterable of keys, not a single str")
        wanted = list(keys)
        for key in wanted:
            encode_key(key)
        present.want(as_, device, None)  # bad arguments fail here, not in the future
        return self._prefetcher.prefetch(
            wanted, lambda ks: self.get_many(ks, device=device, as_=as_)
        )

    def stream(
        self,
        keys: Iterable[str],
        *,
        lookahead: int = 4,
        device: Any = None,
        as_: str | None = None,
    ) -> Iterator[tuple[str, Any]]:
        """Yield ``(key, get(key, device=, as_=))`` in order, the next ``lookahead`` in flight.

        A miss yields ``(key, None)``; a failed get raises at its item; stopping
        early cancels or waits out the gets in flight (client/prefetch.py).
        """
        present.want(as_, device, None)
        return self._prefetcher.stream(
            keys, lookahead, lambda k: self.get(k, device=device, as_=as_)
        )

    def _get_one(
        self, key: str, dest: np.ndarray | codec.OutView | None
    ) -> tuple[np.ndarray | None, int, str]:
        """``_get_many`` of one key, without its dicts and lists (#18: per-call cost).

        A striped tensor (a manifest came back) takes ``_get_many``, which
        reads the manifest again: one small round trip more next to >= 8 MiB.
        """
        encode_key(key)
        it = GetItem(key, pb.TENSOR, out=dest)
        self._read([it])
        if it.found and it.meta is not None and it.meta.stripes:
            return self._get_many([key], {key: dest} if dest is not None else None)[key]
        if not it.found:
            self._count("gets", hits=0, misses=1, bytes_got=0)
            return None, 0, ""
        array = compress.restore(it.meta, it.array, it.out)
        got = array.nbytes if array is not None else 0
        self._count("gets", hits=int(array is not None), misses=int(array is None), bytes_got=got)
        return array, it.version, _logical(it)

    def _get_many(
        self, keys: Iterable[str], outs: dict[str, np.ndarray | codec.OutView] | None
    ) -> dict[str, tuple[np.ndarray | None, int, str]]:
        """key -> (array or None, version, logical dtype) for every key."""
        wanted = list(dict.fromkeys(keys))
        for key in wanted:
            encode_key(key)
        out: dict[str, tuple[np.ndarray | None, int, str]] = dict.fromkeys(wanted, (None, 0, ""))
        pending = wanted
        # A stripe can vanish under a reader when a newer put replaced it;
        # read the manifest again (bounded) before calling it a miss.
        for _ in range(3):
            items = [GetItem(k, pb.TENSOR, out=outs.get(k) if outs else None) for k in pending]
            self._read(items)
            striped = [it for it in items if it.found and it.meta is not None and it.meta.stripes]
            for it in items:
                if it.found and it not in striped:
                    out[it.key] = (
                        compress.restore(it.meta, it.array, it.out),
                        it.version,
                        _logical(it),
                    )
            pending = []
            if striped:
                for it, ok in zip(
                    striped, striping.fetch(striped, self._read, self._count), strict=True
                ):
                    if ok:
                        out[it.key] = (
                            compress.restore(it.meta, it.array, it.out),
                            it.version,
                            _logical(it),
                        )
                    else:
                        pending.append(it.key)
            if not pending:
                break
            self._count("stripe_retries", len(pending))
        hits = sum(a is not None for a, _, _ in out.values())
        got = sum(a.nbytes for a, _, _ in out.values() if a is not None)
        self._count("gets", len(out), hits=hits, misses=len(out) - hits, bytes_got=got)
        return out

    def stats(self) -> list[NodeStats]:
        """One record per node in the ring (unreachable nodes: reachable=False)."""
        ring = self._placement.refresh(self._placement.current())

        def one(member: RingMember) -> NodeStats:
            try:
                return wire.node_stats(self._nodes.stat(member, self.config.timeout_s))
            except TensorCacheError:
                return wire.unreachable(member)

        return list(self._pool.map(one, ring.members))

    def hot_keys(self, limit: int = 1000) -> list[tuple[str, int]]:
        """Up to ``limit`` of the cluster's most recently used keys: (key, nbytes).

        Each node ranks its own keys by last use; the lists are merged rank
        by rank (each node's hottest, then each one's second, ...), replicas
        counted once. What ``tensorcache hot`` exports to re-warm a cluster.
        """
        if not isinstance(limit, int) or not 0 < limit <= 100_000:
            raise InvalidArgument(f"limit must be an int in 1..100000, got {limit!r}")
        ring = self._placement.refresh(self._placement.current())
        request = pb.StatRequest(hot_keys=limit)

        def one(member: RingMember) -> list[pb.HotKey]:
            try:
                return list(self._nodes.stat(member, self.config.timeout_s, request).hot)
            except TensorCacheError:
                return []

        lists = list(self._pool.map(one, ring.members))
        out: dict[str, int] = {}
        for rank in range(max((len(x) for x in lists), default=0)):
            for hot in lists:
                if rank < len(hot) and len(out) < limit:
                    out.setdefault(hot[rank].key.decode(), hot[rank].nbytes)
        return list(out.items())

    def _free_stripes(self, refs: list[pb.StripeRef]) -> None:
        """Delete stripes of replaced/deleted tensors; best effort."""
        striping.free(
            refs,
            self._replicas(),
            lambda items: self._fan.scatter(items, self._nodes.delete),
            self._count,
        )


def _logical(it: GetItem) -> str:
    return it.meta.logical_dtype if it.meta is not None else ""


def connect(
    router: str,
    *,
    stripe_size: int | str | None = None,
    near_cache: int | str | None = None,
    near_cache_mode: str | None = None,
    config: ClientConfig | None = None,
    token: str | None = None,
    tls: TLSFiles | None = None,
    **options: Any,
) -> Client:
    """Connect to the cluster whose router listens at ``router`` (host:port).

    ``stripe_size`` ("8MiB") overrides the cluster's default; ``near_cache``
    ("512MiB") keeps hot tensors in this process, revalidated per get; other keyword
    options are ClientConfig fields (timeout_s, parallelism, chunk_size, …).
    ``token``: presented on every call when the cluster checks tokens
    (docs/security.md); default: the TENSORCACHE_TOKEN environment variable.
    ``tls``: mutual TLS (``tensorcache.TLSFiles(cert, key, ca)``) on every
    channel; default: TENSORCACHE_TLS_CERT/_KEY/_CA when set.
    """
    token = token if token is not None else os.environ.get(TOKEN_ENV) or None
    tls = tls if tls is not None else TLSFiles.from_env()
    if config is None:
        options["token"] = token
        options["tls"] = tls
        if stripe_size is not None:
            options["stripe_size"] = parse_size(stripe_size)
        if near_cache is not None:
            options["near_cache_bytes"] = parse_size(near_cache)
        if near_cache_mode is not None:
            options["near_cache_mode"] = near_cache_mode
        try:
            config = ClientConfig(**options)
        except TypeError as exc:
            raise InvalidArgument(f"connect: {exc}") from exc
    if not isinstance(router, str) or ":" not in router:
        raise InvalidArgument(f"router must be 'host:port', got {router!r}")
    else:
        if token is not None and config.token is None:
            config = dataclasses.replace(config, token=token)
        if tls is not None and config.tls is None:
            config = dataclasses.replace(config, tls=tls)
    return Client(router, config)
