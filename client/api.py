"""The client a worker imports: ``tensorcache.connect(router) -> Client``.

How a tensor is stored
----------------------
A tensor of at most ``stripe_size`` bytes is one entry on the node that owns
its key. A larger one is cut into stripes; each stripe is an entry of kind
SHARD whose key embeds a random *put id*, so it hashes (and lands)
independently and stripes of two puts of the same key never overwrite each
other. The put writes every stripe first and then a *manifest* (dtype,
shape, and each stripe's key, offset, size and CRC32C) under the tensor's
own key: the manifest is the commit point, so a put is visible only once all
of it is stored. A get reads the manifest, fetches the stripes in parallel
straight into one preallocated array, and checks each stripe against the
manifest; a missing or mismatched stripe is a miss, never garbage.

Concurrency
-----------
A ``Client`` is thread-safe. Fan-out RPCs run on one thread pool; a public
call submits tasks and waits, tasks never submit tasks, so the pool cannot
deadlock. gRPC channels do not survive ``fork()``: connect in each process.
"""

from __future__ import annotations

import functools
import logging
import secrets
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import numpy as np

from tensorcache import codec, localread
from tensorcache.client.config import ClientConfig, NodeStats
from tensorcache.client.datachannel import DataPool
from tensorcache.client.fence import fence_all
from tensorcache.client.fill import FillOptions, RpcGrants, read_through, store_if_absent
from tensorcache.client.nearcache import NearCache
from tensorcache.client.placement import Placement
from tensorcache.client.transport import (
    ConnPool,
    RouterConn,
    payload_messages,
    read_payload,
)
from tensorcache.client.watch import EventWatcher
from tensorcache.errors import (
    CapacityExceeded,
    InvalidArgument,
    ProtocolError,
    StaleEpoch,
    TensorCacheError,
    Unavailable,
    from_rpc_error,
)
from tensorcache.keys import encode_key, shard_key
from tensorcache.proto import tensorcache_pb2 as pb
from tensorcache.ring import RingMember
from tensorcache.sizes import parse_size

log = logging.getLogger("tensorcache.client")

T = TypeVar("T")

__all__ = ["Client", "ClientConfig", "NodeStats", "connect"]


# ------------------------------------------------------------------ work items
@dataclass(eq=False)
class _Put:
    """One entry to write: a small tensor, a stripe, or a manifest."""

    key: str
    kind: int
    meta: pb.TensorMeta
    view: np.ndarray | None  # payload (None for a manifest)
    version: int = 0
    replaced: list[pb.StripeRef] = field(default_factory=list)
    cond: int | None = None  # if_version of a conditional put
    replica: int = 0  # which copy: 0 = the primary, i = replica_set(key)[i]
    exact: int = 0  # a replica copy: store exactly this version (the primary's)
    kept_newer: bool = False

    @property
    def nbytes(self) -> int:
        return 0 if self.view is None else self.view.nbytes


@dataclass(eq=False)
class _Get:
    """One entry to read; ``dest`` is where its payload goes (None: allocate)."""

    key: str
    kind: int
    found: bool = False
    version: int = 0
    meta: pb.TensorMeta | None = None
    array: np.ndarray | None = None
    dest: np.ndarray | None = None  # flat uint8 destination
    expect: pb.StripeRef | None = None  # for stripes: what the manifest promised
    put_id: int = 0
    ok: bool = False
    out: np.ndarray | None = None  # the caller's array to fill (get(key, out=...))
    replica: int = 0  # failover cursor into replica_set(key)

    @property
    def nbytes(self) -> int:
        return self.expect.nbytes if self.expect is not None else 0


@dataclass(eq=False)
class _Fill:
    """One Fill RPC (ask, renew or release a fill grant; client/fill.py)."""

    key: str
    holder: str
    filler: str
    ttl_ms: int
    release: bool
    timeout_s: float
    reply: pb.FillReply | None = None
    nbytes = 0
    replica = 0


@dataclass(eq=False)
class _Del:
    key: str
    kind: int
    found: bool = False
    stripes: list[pb.StripeRef] = field(default_factory=list)
    replica: int = 0  # which copy to delete

    nbytes = 0


class Client:
    """A connection to a tensorcache cluster. Use ``tensorcache.connect``."""

    def __init__(self, router: str, config: ClientConfig | None = None) -> None:
        self.config = config or ClientConfig()
        self._router = RouterConn(router)
        self._placement = Placement(self._router, self.config.timeout_s)
        self._conns = ConnPool()
        self._data = DataPool(self.config.timeout_s)
        self._local: dict[str, bool] = {}
        self._near = (
            NearCache(self.config.near_cache_bytes) if self.config.near_cache_bytes else None
        )
        self._watch: EventWatcher | None = None
        self._pool = ThreadPoolExecutor(self.config.parallelism, thread_name_prefix="tensorcache")
        self._closed = False
        self._mlock = threading.Lock()
        self._metrics: dict[str, int] = defaultdict(int)
        try:
            self._placement.current()
        except TensorCacheError:
            self.close()
            raise
        if self._near is not None and self.config.near_cache_mode == "watch":
            self._watch = EventWatcher(self._router, self._near)

    # ------------------------------------------------------------ lifecycle
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._watch is not None:
            self._watch.close()
        self._pool.shutdown(wait=True)
        self._conns.close()
        self._data.close()
        self._router.close()

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
        return out

    def _count(self, name: str, n: int = 1, **more: int) -> None:
        with self._mlock:
            self._metrics[name] += n
            for k, v in more.items():
                self._metrics[k] += v

    # ------------------------------------------------------------ public API
    def put(self, key: str, value: np.ndarray, *, if_version: int | None = None) -> int:
        """Store ``value`` under ``key``; returns its new version.

        ``if_version``: store only if the key's current version is this one
        (0: only if absent), checked atomically on the owner node; otherwise
        raise ``VersionConflict`` and leave the stored value as it was.
        """
        if if_version is not None and (not isinstance(if_version, int) or if_version < 0):
            raise InvalidArgument(f"if_version must be an int >= 0, got {if_version!r}")
        return self._put_many({key: value}, {key: if_version} if if_version is not None else None)[
            key
        ]

    def _near_get(self, key: str, out: np.ndarray | None) -> tuple[np.ndarray, int] | None:
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
            return near.array.copy(order="K"), near.version
        layout, _ = codec.encode(near.array)  # the cached copy is contiguous: no copy
        codec.view_for(out, layout)  # same checks as a get into out=
        np.copyto(out, near.array)
        return out, near.version

    def get_or_load(
        self,
        key: str,
        loader: Callable[[], np.ndarray],
        *,
        lease_s: float = 2.0,
        max_load_s: float | None = None,
        timeout_s: float = 600.0,
        fill_ttl_s: float | None = None,
    ) -> np.ndarray:
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

    def _fill(
        self, key: str, holder: str, filler: str, ttl_ms: int, *, release: bool, timeout_s: float
    ) -> pb.FillReply:
        items = [_Fill(key, holder, filler, ttl_ms, release, timeout_s)]
        self._scatter(items, self._fill_call)
        assert items[0].reply is not None
        return items[0].reply

    def _fill_call(self, member: RingMember, epoch: int, batch: list[_Fill]) -> None:
        for it in batch:
            request = pb.FillRequest(
                epoch=epoch, key=it.key.encode(), holder=it.holder, ttl_ms=it.ttl_ms,
                release=it.release, filler=it.filler,
            )  # fmt: skip
            try:
                it.reply = self._conns.get(member.address).fill(
                    request, timeout=min(self.config.timeout_s, it.timeout_s)
                )
            except grpc.RpcError as exc:
                raise from_rpc_error(exc, f"fill on node {member.address}") from exc

    def version(self, key: str) -> int | None:
        """The current version of ``key``, or None if absent (no bytes move)."""
        encode_key(key)
        items = [_Get(key, pb.TENSOR)]
        self._read(items, self._head_call)
        return items[0].version if items[0].found else None

    def get(
        self, key: str, *, out: np.ndarray | None = None, min_version: int | None = None
    ) -> np.ndarray | None:
        """The tensor stored under ``key``, or None on a miss.

        ``out``: an array of the stored dtype and shape (writable, contiguous
        in the stored order) to fill instead of allocating one. Reusing a
        destination skips the page faults of fresh memory, the largest cost
        left on the co-located path. On a miss ``out`` is left as it was only
        if nothing was received; treat its contents as undefined then.

        ``min_version``: never return a value older than this version; an
        older one is reported as a miss (None).
        """
        hit = self._near_get(key, out) if self._near is not None else None
        if hit is not None:
            array, version = hit
        else:
            seq = self._near.seq if self._near is not None else 0
            array, version = self._get_many([key], {key: out} if out is not None else None)[key]
            if self._near is not None:
                if array is None:
                    self._near.drop(key)
                else:
                    self._near.store(key, array, version, seq)
        if array is not None and min_version is not None and version < min_version:
            self._count("stale_rejected")
            return None
        return array

    def delete(self, key: str) -> bool:
        """Remove ``key``; returns whether it was present."""
        encode_key(key)
        items = [_Del(key, pb.TENSOR, replica=i) for i in range(self._replicas())]
        self._scatter(items, self._delete_call)
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
        try:
            reply: pb.InvalidateReply = self._router.stub.Invalidate(
                pb.InvalidateRequest(prefix=prefix), timeout=timeout
            )
        except grpc.RpcError as exc:
            where = f"invalidate {prefix!r} at router {self._router.address}"
            raise from_rpc_error(exc, where) from exc
        generation = reply.generation
        fence_all(
            self._placement, self._conns, self._pool, generation, timeout, f"invalidate {prefix!r}"
        )
        if self._near is not None:
            self._near.drop_prefix(prefix)
        self._count("invalidations")
        return generation

    def _read(
        self, items: list[_Get], call: Callable[[RingMember, int, list[_Get]], None] | None = None
    ) -> None:
        """Get ``items`` from their primaries (failing over when unreachable).

        With R >= 2 a miss at the primary is confirmed at the next replica: a
        primary that has just joined or restarted may not hold its copy yet
        (re-replication and handoff fill it within milliseconds, but a read
        can come first). The replica holds every completed put too (writes go
        to all replicas), so its answer is as fresh as the primary's. Costs
        one more round trip per miss, only with replication.
        """
        call = call or self._get_call
        self._scatter(items, call, failover=True)
        if self._replicas() < 2:
            return
        missed = [it for it in items if not it.found and it.replica == 0]
        if missed:
            for it in missed:
                it.replica = 1
            self._scatter(missed, call)
            found = sum(it.found for it in missed)
            self._count("misses_confirmed", len(missed), replica_hits=found)

    def _replicas(self) -> int:
        """Copies the cluster keeps of each entry (RingSnapshot.replicas)."""
        return self._placement.current().replicas

    def put_many(self, values: Mapping[str, np.ndarray]) -> dict[str, int]:
        """Store several tensors (grouped per node into few RPCs); returns versions."""
        return self._put_many(values, None)

    def _put_many(
        self, values: Mapping[str, np.ndarray], conditions: dict[str, int] | None
    ) -> dict[str, int]:
        if not isinstance(values, Mapping):
            raise InvalidArgument(
                f"put_many takes a mapping of key -> array, got {type(values).__name__}"
            )
        stripe = self.stripe_size
        copies = self._replicas()
        tensors: list[_Put] = []
        shards: list[_Put] = []
        for key, value in values.items():
            encode_key(key)
            layout, view = codec.encode(value)
            meta = pb.TensorMeta(
                dtype=layout.dtype, shape=layout.shape, order=layout.order, nbytes=layout.nbytes
            )
            if layout.nbytes <= stripe:
                meta.crc32c = codec.crc32c(view)
                tensors.append(_Put(key, pb.TENSOR, meta, view, cond=_cond(conditions, key)))
                continue
            meta.put_id = secrets.randbits(63) | 1
            for i, off in enumerate(range(0, layout.nbytes, stripe)):
                part = view[off : off + stripe]
                skey = shard_key(key, meta.put_id, i)
                ref = meta.stripes.add(
                    key=skey.encode(), offset=off, nbytes=part.nbytes, crc32c=codec.crc32c(part)
                )
                smeta = pb.TensorMeta(
                    dtype="|u1",
                    shape=[part.nbytes],
                    order="C",
                    nbytes=part.nbytes,
                    crc32c=ref.crc32c,
                    put_id=meta.put_id,
                )
                shards.extend(_Put(skey, pb.SHARD, smeta, part, replica=i) for i in range(copies))
            tensors.append(_Put(key, pb.TENSOR, meta, None, cond=_cond(conditions, key)))
        if shards:
            self._check_fits(shards)
            try:
                self._scatter(shards, self._put_call)  # stripes first: the manifest commits
            except TensorCacheError:
                self._free_stripes([r for it in tensors for r in it.meta.stripes])
                raise
        try:
            self._scatter(tensors, self._put_call)  # the primary assigns each version
            if copies > 1:
                # Then every other replica stores exactly that version. The
                # put returns only once all of them have (docs/consistency.md).
                self._scatter(
                    [
                        _Put(it.key, it.kind, it.meta, it.view, replica=i, exact=it.version)
                        for it in tensors
                        for i in range(1, copies)
                    ],
                    self._put_call,
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

    def get_many(self, keys: Iterable[str]) -> dict[str, np.ndarray | None]:
        """Fetch several tensors (one RPC per node and batch); misses map to None."""
        if isinstance(keys, str):
            raise InvalidArgument("get_many takes an iterable of keys, not a single str")
        return {k: array for k, (array, _) in self._get_many(keys, None).items()}

    def _get_many(
        self, keys: Iterable[str], outs: dict[str, np.ndarray] | None
    ) -> dict[str, tuple[np.ndarray | None, int]]:
        """key -> (array or None, version) for every key."""
        wanted = list(dict.fromkeys(keys))
        for key in wanted:
            encode_key(key)
        out: dict[str, tuple[np.ndarray | None, int]] = dict.fromkeys(wanted, (None, 0))
        pending = wanted
        # A stripe can vanish under a reader when a newer put replaced it;
        # read the manifest again (bounded) before calling it a miss.
        for _ in range(3):
            items = [_Get(k, pb.TENSOR, out=outs.get(k) if outs else None) for k in pending]
            self._read(items)
            striped = [it for it in items if it.found and it.meta is not None and it.meta.stripes]
            for it in items:
                if it.found and it not in striped:
                    out[it.key] = (it.array, it.version)
            pending = []
            if striped:
                for it, ok in zip(striped, self._fetch_stripes(striped), strict=True):
                    if ok:
                        out[it.key] = (it.array, it.version)
                    else:
                        pending.append(it.key)
            if not pending:
                break
            self._count("stripe_retries", len(pending))
        hits = sum(a is not None for a, _ in out.values())
        self._count("gets", len(out), hits=hits, misses=len(out) - hits)
        return out

    def stats(self) -> list[NodeStats]:
        """One record per node in the ring (unreachable nodes: reachable=False)."""
        ring = self._placement.refresh(self._placement.current())

        def one(member: Any) -> NodeStats:
            try:
                s: pb.NodeStats = self._conns.get(member.address).stat(
                    pb.StatRequest(), timeout=self.config.timeout_s
                )
            except grpc.RpcError:
                return NodeStats(
                    member.name, member.address, 0, 0, member.capacity, 0, 0, 0, reachable=False
                )
            return NodeStats(
                name=s.name,
                address=s.address,
                keys=s.keys,
                bytes_used=s.bytes_used,
                capacity=s.capacity,
                hits=s.hits,
                misses=s.misses,
                evictions=s.evictions,
                shards=s.shards,
                bytes_reserved=s.bytes_reserved,
                puts=s.puts,
                deletes=s.deletes,
                fills=s.fills,
                fill_waits=s.fill_waits,
                handoffs=s.handoffs,
                drained=s.drained,
                demoted=s.demoted,
                invalidated=s.invalidated,
                rereplicated=s.rereplicated,
                moved=s.moved,
                discarded=s.discarded,
                pending=s.pending,
                revived=s.revived,
                policy=s.policy,
                epoch=s.epoch,
            )

        return list(self._pool.map(one, ring.members))

    # ------------------------------------------------------------ fan-out core
    def _deadline(self, nbytes: int) -> float:
        return self.config.timeout_s + nbytes / self.config.min_throughput

    def _batches(self, items: list[T]) -> list[list[T]]:
        """Split one node's items into RPC-sized batches."""
        out: list[list[T]] = []
        cur: list[T] = []
        size = 0
        for it in items:
            n = getattr(it, "nbytes", 0)
            if cur and (size + n > self.config.batch_bytes or len(cur) >= self.config.batch_keys):
                out.append(cur)
                cur, size = [], 0
            cur.append(it)
            size += n
        if cur:
            out.append(cur)
        return out

    def _scatter(
        self,
        items: Sequence[T],
        call: Callable[[RingMember, int, list[T]], None],
        *,
        failover: bool = False,
    ) -> None:
        """Run ``call`` on every item, grouped by node, in parallel.

        Each item goes to ``ring.replica_set(key)[item.replica]`` (an item
        whose copy index is beyond a small ring's replica set is done). The
        one place failure policy lives: with ``failover`` (reads), an
        unreachable node sends its items to the key's next replica at once,
        with no wait; otherwise, and once every replica failed, a stale epoch
        or an unreachable node refreshes the ring and retries just the failed
        items, up to ``retries`` times with exponential backoff (counted in
        metrics); any other error is raised once all batches finished.
        """
        pending = list(items)
        last: TensorCacheError | None = None
        attempt = 0
        while True:
            ring = self._placement.current()
            groups: dict[str, list[T]] = defaultdict(list)
            members: dict[str, RingMember] = {}
            for it in pending:
                copies = ring.replica_set(it.key)  # type: ignore[attr-defined]
                idx: int = it.replica  # type: ignore[attr-defined]
                if idx >= len(copies):
                    continue  # fewer members than replicas: this copy has no home
                member = copies[idx]
                members[member.name] = member
                groups[member.name].append(it)
            tasks = [
                (members[name], batch)
                for name, group in groups.items()
                for batch in self._batches(group)
            ]
            results = self._run_all(
                [functools.partial(call, member, ring.epoch, batch) for member, batch in tasks]
            )
            failed: list[T] = []
            moved: list[T] = []
            fatal: TensorCacheError | None = None
            stale_epoch = 0
            for (_member, batch), exc in zip(tasks, results, strict=True):
                if exc is None:
                    continue
                if isinstance(exc, StaleEpoch):
                    stale_epoch = max(stale_epoch, exc.epoch)
                    failed.extend(batch)
                elif isinstance(exc, Unavailable):
                    for it in batch:
                        if failover and it.replica + 1 < len(ring.replica_set(it.key)):  # type: ignore[attr-defined]
                            it.replica += 1  # type: ignore[attr-defined]
                            moved.append(it)
                        else:
                            failed.append(it)
                elif isinstance(exc, TensorCacheError):
                    fatal = fatal or exc
                else:
                    raise exc
                last = exc if isinstance(exc, TensorCacheError) else last
            if fatal is not None:
                raise fatal
            if moved:
                self._count("failovers", len(moved))
            if failover:
                for it in failed:
                    it.replica = 0  # type: ignore[attr-defined]  # a new ring: its primary first
            if not failed and not moved:
                return
            pending = failed + moved
            if not failed:
                continue  # only failovers: same ring, next replicas, no wait
            self._count("retries")
            if attempt >= self.config.retries:
                break
            if stale_epoch == 0:  # unreachable node: give membership time to notice
                time.sleep(self.config.retry_backoff_s * (2 ** min(attempt, 4)))
            attempt += 1
            try:
                self._placement.refresh(ring, stale_epoch)
            except Unavailable as exc:
                last = exc
        raise last if last is not None else Unavailable("retries exhausted")

    def _run_all(self, fns: list[Callable[[], None]]) -> list[BaseException | None]:
        if len(fns) == 1:
            try:
                fns[0]()
                return [None]
            except Exception as exc:
                return [exc]
        futs: list[Future[None]] = [self._pool.submit(fn) for fn in fns]
        return [f.exception() for f in futs]

    # ------------------------------------------------------------ RPC calls
    def _data_channel(self, member: RingMember) -> bool:
        return self.config.transport == "auto" and bool(member.data_address)

    def _data_fallback(self, member: RingMember, exc: Exception) -> None:
        """The data channel failed: this call goes over gRPC instead (counted)."""
        self._count("data_fallbacks")
        log.info("data channel of %s unavailable (%s); using gRPC", member.name, exc)

    def _is_local(self, member: RingMember) -> bool:
        """Whether this process can read ``member``'s memory (probed once per token)."""
        if not (self.config.local_fastpath and member.local_pid and member.local_token):
            return False
        seen = self._local.get(member.local_token)
        if seen is None:
            seen = localread.probe(member.local_pid, member.local_token_addr, member.local_token)
            self._local[member.local_token] = seen
        return seen

    def _read_local(self, member: RingMember, it: _Get, chunks: list[tuple[int, int]]) -> bool:
        assert it.dest is not None and it.meta is not None
        if not localread.read_remote(member.local_pid, chunks, it.dest):
            return False
        self._count("local_reads")
        if self.config.verify_local_checksums:
            it.ok = codec.crc32c(it.dest) == it.meta.crc32c
        else:
            it.ok = True
        if not it.ok:
            self._count("corrupt")
            it.found, it.array = False, None
        return True

    def _destination(
        self, out: np.ndarray | None, layout: codec.Layout
    ) -> tuple[np.ndarray, np.ndarray]:
        if out is None:
            try:
                return codec.allocate(layout)
            except (ValueError, MemoryError) as exc:
                raise ProtocolError(f"cannot allocate {layout}: {exc}") from exc
        return out, codec.view_for(out, layout)

    def _put_call(self, member: RingMember, epoch: int, batch: list[_Put]) -> None:
        header = pb.PutRequest(epoch=epoch)
        for it in batch:
            entry = header.entries.add(key=it.key.encode(), kind=it.kind, meta=it.meta)
            if it.cond is not None:
                entry.if_version = it.cond
            if it.exact:
                entry.version = it.exact
        views = [it.view for it in batch if it.view is not None]
        reply: pb.PutReply | None = None
        if self._data_channel(member):
            try:
                with self._data.connection(member.data_address) as dc:
                    reply = dc.put(header, views)
            except Unavailable as exc:  # a put is all-or-nothing: safe to resend
                self._data_fallback(member, exc)
        if reply is None:
            head = header.SerializeToString()

            def stream() -> Iterable[bytes]:
                yield head
                yield from payload_messages(views, self.config.chunk_size)

            nbytes = sum(v.nbytes for v in views)
            try:
                reply = self._conns.get(member.address).put(
                    stream(), timeout=self._deadline(nbytes)
                )
            except grpc.RpcError as exc:
                raise from_rpc_error(exc, f"put to node {member.address}") from exc
        if len(reply.results) != len(batch):
            raise ProtocolError(
                f"node {member.address} answered {len(reply.results)} of {len(batch)} puts"
            )
        for it, res in zip(batch, reply.results, strict=True):
            it.version = res.version
            it.replaced = list(res.replaced_stripes)
            it.kept_newer = res.kept_newer

    def _get_call(
        self, member: RingMember, epoch: int, batch: list[_Get], *, local: bool = True
    ) -> None:
        request = pb.GetRequest(
            epoch=epoch, keys=[pb.EntryKey(key=it.key.encode(), kind=it.kind) for it in batch]
        )
        where = f"get from node {member.address}"
        carrying: list[_Get] = []

        def destinations(reply: pb.GetReply) -> list[np.ndarray]:
            """Record what each key's header says; allocate where payload goes."""
            if len(reply.entries) != len(batch):
                raise ProtocolError(f"{where}: {len(reply.entries)} headers for {len(batch)} keys")
            dests: list[np.ndarray] = []
            for it, got in zip(batch, reply.entries, strict=True):
                it.found, it.version = got.found, got.version
                if not got.found:
                    continue
                it.meta = got.meta
                if got.meta.stripes:
                    continue  # a manifest: no payload of its own
                layout = self._layout(got.meta, where)
                if it.expect is None:  # a tensor: its own (or the caller's) array
                    it.array, it.dest = self._destination(it.out, layout)
                elif it.dest is None or it.dest.nbytes != layout.nbytes:
                    it.dest = np.empty(layout.nbytes, np.uint8)  # unlike its manifest: miss
                if got.local:
                    shared.append((it, [(c.addr, c.nbytes) for c in got.local]))
                    continue
                dests.append(it.dest)
                carrying.append(it)
            return dests

        shared: list[tuple[_Get, list[tuple[int, int]]]] = []
        crcs: list[int] | None = None
        if self._data_channel(member):
            request.local = local and self._is_local(member)
            try:
                with self._data.connection(member.data_address) as dc:
                    _, crcs = dc.get(request, destinations)
                    # Co-located: copy straight out of the node's memory while
                    # we hold the connection (the node pins those buffers until
                    # our next request on it). Failures refetch over the network.
                    gone = [it for it, ch in shared if not self._read_local(member, it, ch)]
                    if shared:
                        dc.release()  # unpin now, not at our next request
            except Unavailable as exc:
                self._data_fallback(member, exc)
                crcs = None
                carrying.clear()
                shared.clear()
                request.local = False
            else:
                if gone:
                    self._count("local_fallbacks", len(gone))
                    for it in gone:
                        it.found = False
                    self._get_call(member, epoch, gone, local=False)
        if crcs is None:
            nbytes = sum(it.nbytes for it in batch)
            try:
                stream = self._conns.get(member.address).get(
                    request, timeout=self._deadline(nbytes)
                )
                first = next(stream, None)
                if first is None:
                    raise ProtocolError(f"{where}: empty reply stream")
                dests = destinations(pb.GetReply.FromString(first))
                crcs = read_payload(stream, dests, where)
            except grpc.RpcError as exc:
                raise from_rpc_error(exc, where) from exc
        for it, crc in zip(carrying, crcs, strict=True):
            assert it.meta is not None
            it.ok = crc == it.meta.crc32c
            if not it.ok:
                self._count("corrupt")
                log.warning(
                    "%s: %r failed its checksum (got %#010x, want %#010x); treated as a miss",
                    where,
                    it.key[:80],
                    crc,
                    it.meta.crc32c,
                )
                it.found, it.array = False, None

    def _head_call(self, member: RingMember, epoch: int, batch: list[_Get]) -> None:
        """Versions only (GetRequest.head_only over gRPC: no payload)."""
        request = pb.GetRequest(
            epoch=epoch,
            head_only=True,
            keys=[pb.EntryKey(key=it.key.encode(), kind=it.kind) for it in batch],
        )
        where = f"version from node {member.address}"
        try:
            first = next(
                self._conns.get(member.address).get(request, timeout=self.config.timeout_s), None
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, where) from exc
        if first is None:
            raise ProtocolError(f"{where}: empty reply stream")
        reply = pb.GetReply.FromString(first)
        if len(reply.entries) != len(batch):
            raise ProtocolError(f"{where}: {len(reply.entries)} headers for {len(batch)} keys")
        for it, got in zip(batch, reply.entries, strict=True):
            it.found, it.version = got.found, got.version

    def _delete_call(self, member: RingMember, epoch: int, batch: list[_Del]) -> None:
        request = pb.DeleteRequest(
            epoch=epoch, keys=[pb.EntryKey(key=it.key.encode(), kind=it.kind) for it in batch]
        )
        try:
            reply: pb.DeleteReply = self._conns.get(member.address).delete(
                request, timeout=self.config.timeout_s
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, f"delete on node {member.address}") from exc
        for it, res in zip(batch, reply.results, strict=True):
            it.found = res.found
            it.stripes = list(res.stripes)

    @staticmethod
    def _layout(meta: pb.TensorMeta, where: str) -> codec.Layout:
        try:
            return codec.check_layout(meta.dtype, tuple(meta.shape), meta.order, meta.nbytes)
        except InvalidArgument as exc:
            raise ProtocolError(f"{where}: node sent bad metadata: {exc}") from exc

    # ------------------------------------------------------------ stripes
    def _fetch_stripes(self, tensors: list[_Get]) -> list[bool]:
        """Fetch every stripe of every manifest into its tensor's array."""
        parts: list[tuple[_Get, _Get]] = []
        for t in tensors:
            assert t.meta is not None
            layout = self._layout(t.meta, f"manifest of {t.key!r}")
            t.array, whole = self._destination(t.out, layout)
            for ref in t.meta.stripes:
                if ref.offset + ref.nbytes > whole.nbytes:
                    raise ProtocolError(f"manifest of {t.key!r}: stripe beyond the tensor")
                part = _Get(
                    ref.key.decode(),
                    pb.SHARD,
                    dest=whole[ref.offset : ref.offset + ref.nbytes],
                    expect=ref,
                    put_id=t.meta.put_id,
                )
                parts.append((t, part))
        self._read([p for _, p in parts])
        good: dict[int, bool] = {id(t): True for t in tensors}
        for t, p in parts:
            ok = (
                p.found
                and p.ok
                and p.meta is not None
                and p.expect is not None
                and p.meta.put_id == p.put_id
                and p.meta.nbytes == p.expect.nbytes
                and p.meta.crc32c == p.expect.crc32c
            )
            if not ok:
                good[id(t)] = False
        for t in tensors:
            if not good[id(t)]:
                self._count("stripe_misses")
                t.array = None
        return [good[id(t)] for t in tensors]

    def _check_fits(self, shards: list[_Put]) -> None:
        """Refuse, before sending a byte, stripes that cannot fit on their nodes.

        Without this a tensor larger than the cluster would evict every other
        entry on its way to failing.
        """
        ring = self._placement.current()
        need: dict[str, int] = defaultdict(int)
        for it in shards:
            need[ring.owner(it.key).name] += it.nbytes
        for name, nbytes in need.items():
            member = ring.member(name)
            if member is not None and nbytes > member.capacity:
                total = sum(m.capacity for m in ring.members)
                raise CapacityExceeded(
                    f"stripes need {nbytes} bytes on node {name} of capacity {member.capacity} "
                    f"({sum(need.values())} bytes in all; the cluster holds {total} bytes)"
                )

    def _free_stripes(self, refs: list[pb.StripeRef]) -> None:
        """Delete stripes of replaced/deleted tensors; best effort (eviction reclaims the rest)."""
        if not refs:
            return
        try:
            self._scatter(
                [
                    _Del(r.key.decode(), pb.SHARD, replica=i)
                    for r in refs
                    for i in range(self._replicas())
                ],
                self._delete_call,
            )
        except TensorCacheError as exc:
            self._count("stripe_free_failures")
            log.info(
                "could not free %d old stripes (%s); eviction will reclaim them", len(refs), exc
            )


def _cond(conditions: dict[str, int] | None, key: str) -> int | None:
    return conditions.get(key) if conditions else None


def connect(
    router: str,
    *,
    stripe_size: int | str | None = None,
    near_cache: int | str | None = None,
    near_cache_mode: str | None = None,
    config: ClientConfig | None = None,
    **options: Any,
) -> Client:
    """Connect to the cluster whose router listens at ``router`` (host:port).

    ``stripe_size`` ("8MiB") overrides the cluster's default; ``near_cache``
    ("512MiB") keeps hot tensors in this process, revalidated per get; other keyword
    options are ClientConfig fields (timeout_s, parallelism, chunk_size, …).
    """
    if config is None:
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
    return Client(router, config)
