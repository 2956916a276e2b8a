"""The client a worker imports: ``tensorcache.connect(router) -> Client``.

This module holds the public methods only; the parts live beside it:
the read path (client/reads.py), the write path (client/writes.py),
whole-cluster requests (client/admin.py, client/pins.py), what a get
returns (client/present.py), striping (client/striping.py), the fan-out
with its retry and failover policy (client/fanout.py), the node transport
seam and its network implementation (client/nodes.py), placement
(client/placement.py), the near-cache (client/nearcache.py,
client/watch.py), read-through fills (client/fill.py), the work items with
their wire mapping (client/items.py) and the settings (client/config.py).
``tensorcache.testing`` provides an in-memory cluster behind the same seams.

Concurrency: a ``Client`` is thread-safe. Fan-out RPCs run on one thread
pool; a public call submits tasks and waits, tasks never submit tasks, so the
pool cannot deadlock. gRPC channels do not survive ``fork()``: connect in
each process.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from tensorcache.authgrpc import Credentials
from tensorcache.client import admin, present
from tensorcache.client import metrics as client_metrics
from tensorcache.client.config import ClientConfig, NodeStats, connect_config
from tensorcache.client.fanout import FanOut
from tensorcache.client.fill import FillOptions, RpcGrants, read_through, store_if_absent
from tensorcache.client.items import FillItem, GetItem
from tensorcache.client.metrics import timed
from tensorcache.client.nearcache import NearCache
from tensorcache.client.nodes import NetworkTransport, NodeTransport
from tensorcache.client.pins import PinResult, pin_all
from tensorcache.client.placement import Placement
from tensorcache.client.prefetch import Prefetcher
from tensorcache.client.reads import Reads
from tensorcache.client.transport import RouterConn, RouterTransport
from tensorcache.client.watch import EventWatcher
from tensorcache.client.writes import Writes
from tensorcache.errors import InvalidArgument, TensorCacheError
from tensorcache.keys import encode_key
from tensorcache.metrics import Recorder
from tensorcache.proto import tensorcache_pb2 as pb
from tensorcache.ring import RingMember
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
        self._reads = Reads(
            self._fan, self._placement, self._nodes, self._near, self._watch_live, self._count
        )
        self._writes = Writes(
            self._fan,
            self._placement,
            self._nodes,
            self._near,
            self.config,
            lambda: self.stripe_size,
            self._count,
        )
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
            counts = dict(self._metrics)
        return client_metrics.counters(counts, self._placement.refreshes, self._near, self._watch)

    def _watch_live(self) -> bool:
        """Whether the watch stream vouches for near-cache copies now (docs/consistency.md)."""
        return self._watch is not None and self._watch.live

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
        return self._writes.put_many(
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
        return self.fill_once(
            key,
            lookup=lambda: self.get(key),
            load=loader,
            store=store_if_absent(lambda v: self.put(key, v, if_version=0), key, self._count),
            lease_s=lease_s,
            max_load_s=max_load_s,
            timeout_s=timeout_s,
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
        return self._reads.version(key)

    def versions(self, keys: Iterable[str]) -> dict[str, int | None]:
        """``version`` of many keys at once: one head-only RPC per node and batch."""
        if isinstance(keys, str):
            raise InvalidArgument("versions takes an iterable of keys, not a single str")
        return self._reads.versions(keys)

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
        if present.to_device(w):
            return present.device_get(self, key, w, min_version)
        array, version, logical = self._reads.host(key, present.out_dest(out))
        if array is not None and min_version is not None and version < min_version:
            self._count("stale_rejected")
            return None
        return present.present(key, array, logical, w)

    def delete(self, key: str) -> bool:
        """Remove ``key``; returns whether it was present."""
        return self._writes.delete(key)

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
        timeout = timeout_s if timeout_s is not None else self.config.timeout_s
        generation = admin.invalidate(
            self._control, self._placement, self._nodes, self._pool, prefix, timeout
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
        """Read ``items`` as every get does (client/reads.py); client/staging.py uses it."""
        self._reads.read(items, call)

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
        return self._writes.put_many(values, None, compression, pin=pin)

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
        if present.to_device(w):
            return present.device_get_many(self, list(keys), w)
        return {
            k: present.present(k, array, logical, w)
            for k, (array, _, logical) in self._reads.many_near(keys).items()
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

    def stats(self) -> list[NodeStats]:
        """One record per node in the ring (unreachable nodes: reachable=False)."""
        return admin.stats(self._placement, self._nodes, self._pool, self.config.timeout_s)

    def hot_keys(self, limit: int = 1000) -> list[tuple[str, int]]:
        """Up to ``limit`` of the cluster's most recently used keys: (key, nbytes).

        Each node ranks its own keys by last use; the lists are merged rank
        by rank (each node's hottest, then each one's second, ...), replicas
        counted once. What ``tensorcache hot`` exports to re-warm a cluster.
        """
        return admin.hot_keys(
            self._placement, self._nodes, self._pool, self.config.timeout_s, limit
        )


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
    config = connect_config(
        router,
        stripe_size=stripe_size,
        near_cache=near_cache,
        near_cache_mode=near_cache_mode,
        config=config,
        token=token,
        tls=tls,
        options=options,
    )
    return Client(router, config)
