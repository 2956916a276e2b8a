"""What a node does, independent of transport: validate, place-check, store.

Both adapters (the gRPC servicer in service.py and the TCP data channel in
dataserver.py) parse a header, call these functions, and move payload bytes
their own way. Errors are raised from the one exception tree
(tensorcache.errors) and mapped to a status by each adapter via
``errors.status_code``.

The consistency rules of docs/consistency.md meet here: entries are stamped
with the epoch they were committed at and vanish under a namespace
invalidation (the store's ``stale`` rule, from node/rings.py); placement is
judged lazily per entry (node/store.py) and a background scan pushes every
entry to the members of its replica set that lack it (node/rebalance.py), so
a ring change costs O(1) here; a miss asks the previous
owners (node/handoff.py); the first write of an epoch fences the peers
(node/fence.py); commits and deletes are published as key events
(node/events.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from tensorcache.errors import DataCorruption, InvalidArgument, StaleEpoch, Unavailable
from tensorcache.localread import address_of
from tensorcache.node.entry import MAX_VERSION  # the largest version a put may carry
from tensorcache.node.events import EventSink, NoEvents
from tensorcache.node.fence import Fencer
from tensorcache.node.fill import FillLeases
from tensorcache.node.handoff import Handoff
from tensorcache.node.lease import LeaseGuard
from tensorcache.node.pace import Activity, PaceConfig, Pacer
from tensorcache.node.peers import GrpcPeers, Peers
from tensorcache.node.rebalance import Rebalancer
from tensorcache.node.rings import Earlier, RingView
from tensorcache.node.store import (
    Entry,
    Holder,
    NewEntry,
    Reservation,
    Store,
    StoreKey,
    entry_cost,
)
from tensorcache.node.tiered import TieredStore, disk_stats
from tensorcache.node.validate import check_meta, store_key, store_keys, tensor_meta
from tensorcache.proto import tensorcache_pb2 as pb
from tensorcache.ring import Ring

log = logging.getLogger("tensorcache.node")

MAX_BATCH_ENTRIES = 65536
MAX_FILL_TTL_MS = 60_000  # a fill lease's longest period (it is renewed, so short)
# Smaller entries go in the payload even to co-located clients: one
# process_vm_readv call per entry costs more than a share of one socket read.
LOCAL_MIN = 256 * 1024
Buffer = bytes | bytearray | memoryview | np.ndarray


class EpochView:
    """The newest ring epoch this node has heard of (from router heartbeats).

    Only moves forward. The agent publishes an epoch here only after it has
    installed that epoch's ring: a request let through at epoch E is then
    always judged (ownership, invalidations) by a ring at least as new as E.
    """

    def __init__(self) -> None:
        self._epoch = 0
        self._lock = threading.Lock()

    @property
    def epoch(self) -> int:
        return self._epoch

    def update(self, epoch: int) -> None:
        with self._lock:
            self._epoch = max(self._epoch, epoch)


@dataclass
class PutPlan:
    """A validated put with its bytes reserved; finish or abort it exactly once."""

    req: pb.PutRequest
    keys: list[StoreKey]
    sizes: list[int]  # payload bytes per entry (0 for a manifest)
    costs: list[int]
    reservation: Reservation
    ring: Ring | None  # the node's ring when the put was admitted
    # Each entry's metadata, serialized once here: it sizes the entry's cost
    # and is what the store keeps (a 4 KiB put re-serialized it; #18 profile).
    metas: list[bytes] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.sizes)


class NodeOps:
    def __init__(
        self,
        store: Store,
        name: str,
        address: str,
        epochs: EpochView,
        *,
        rings: RingView | None = None,
        peers: Peers | None = None,
        events: EventSink | None = None,
        sync: Callable[[int], None] | None = None,
        rereplicate: bool = True,
        incarnation: int = 0,
        pace: PaceConfig | None = None,
    ) -> None:
        """``rings`` must be the view whose ``stale`` and placement rules the store uses.

        ``sync(epoch)``: bring this node's ring up to ``epoch`` from its router
        (the Fence RPC); None for a node without a router. ``rereplicate``:
        push entries to replicas that lack them after ring changes (False:
        handoff on a miss only). ``incarnation``: this process's random id
        (pb.Member.incarnation), part of who holds a copy. ``pace``: how
        background scans yield to gets and puts (node/pace.py).
        """
        self.store = store
        self.fills = FillLeases()
        self.name = name
        self.address = address
        self.epochs = epochs
        self.rings = rings if rings is not None else RingView(name)
        self.peers = peers if peers is not None else GrpcPeers()
        self.events = events if events is not None else NoEvents()
        self.me: Holder = (name, address, incarnation)
        self.handoff = Handoff(store, self.rings, self.peers, me=self.me)
        self.fencer = Fencer(self.rings, self.peers)
        pace = pace if pace is not None else PaceConfig()
        #: The data path's load, read by background work (node/pace.py).
        self.activity = Activity(pace.idle_s)
        self.rebalancer = Rebalancer(
            name,
            store,
            self.rings,
            self.peers,
            enabled=rereplicate,
            resolve=self.handoff.fetch,
            pacer=Pacer(self.activity.busy, pace),
        )
        self._sync = sync
        self._sync_lock = threading.Lock()
        #: Holds requests after the process stalled past its lease, until a
        #: heartbeat has run (node/lease.py); None: no router, nothing to hold.
        self.lease: LeaseGuard | None = None
        #: Set when a SIGTERM drain begins: pushes from other nodes are refused
        #: from then on (a copy accepted after our last drain round would be lost).
        self.leaving = False

    def check_epoch(self, epoch: int) -> None:
        """Refuse a request placed with an older ring; catch up with a newer one.

        0 means "not placed with a ring" (admin tools). A client epoch newer
        than ours means the router changed the ring and we have not heard yet:
        answering under our older ring would be wrong in ways that matter (a
        node that just (re)joined would miss keys its previous owners still
        hold, because it does not yet know it owns them), so we fetch the new
        ring first, once for all requests that wait on it (bounded by the
        agent's sync timeout; past it we answer with what we have).

        First of all: a node resumed after a stall longer than its lease
        serves nothing until it knows whether the ring went on without it
        (node/lease.py).
        """
        if self.lease is not None:
            self.lease.check()
        current = self.epochs.epoch
        if epoch > current and self._sync is not None:
            with self._sync_lock:
                if epoch > self.epochs.epoch:
                    self._sync(epoch)
            current = self.epochs.epoch
        if epoch and epoch < current:
            raise StaleEpoch(
                f"stale epoch {epoch}: node {self.name} is at epoch {current}; refresh the ring",
                current,
            )

    def _check_stamps(self, req: pb.PutRequest) -> None:
        """Refuse a pushed stamp beyond the cluster's epoch.

        A stamp is the epoch of an entry's first commit, never later than the
        ring's; invalidation hides entries stamped below its epoch, so a copy
        stamped 2**64-1 would outlive every invalidation. The pusher may know
        a newer ring than we do: catch up with the router first (bounded, as
        for a client's newer epoch), then judge.
        """
        top = max(e.stamp for e in req.entries)
        if top <= self.epochs.epoch:
            return
        if self._sync is not None:
            with self._sync_lock:
                if top > self.epochs.epoch:
                    self._sync(top)
        if top > self.epochs.epoch:
            i = next(i for i, e in enumerate(req.entries) if e.stamp == top)
            raise InvalidArgument(
                f"entries[{i}].stamp {top} is beyond the cluster's epoch "
                f"{self.epochs.epoch} (a stamp is the epoch of the entry's first commit)"
            )

    # -- ring changes -------------------------------------------------------------
    def install_ring(self, ring: Ring, earlier: Earlier = ()) -> bool:
        """Adopt ``ring`` (before its epoch is published); O(1) in the entries held.

        Entries are judged against it lazily (node/store.py: demoted when met
        if owned elsewhere now, discarded if their key came back from
        elsewhere) and by the background scan, which also pushes copies to
        replicas that lack them (node/rebalance.py). An invalidation-only
        epoch starts no scan at all: invalidation is checked at read time.
        """
        before = self.rings.placement_epoch
        if not self.rings.install(ring, earlier):
            return False
        if self.rings.placement_epoch != before:
            self.rebalancer.ring_changed()
        return True

    def _placed(self, plan: PutPlan) -> tuple[int, Callable[[str], frozenset[Holder]]]:
        """Where a put's entries stand: (placement epoch, key -> holders).

        A client's write was placed with the ring it was admitted under, and
        the client writes every replica of that ring before its put returns:
        those replicas hold it. A pushed copy (epoch 0) vouches only for this
        node, judged against the ring of the moment.
        """
        mine = frozenset((self.me,))
        # The client placed it with the ring of *its* epoch; the node's own
        # may already be newer (installed before its epoch is published).
        ring = self.rings.placement_at(plan.req.epoch) if plan.req.epoch else None
        if ring is None or self.name not in ring:
            return self.rings.placement_epoch if ring is None else ring.epoch, lambda _key: mine

        def holders(key: str) -> frozenset[Holder]:
            return frozenset(m.incarnation_key for m in ring.replica_set(key)) | mine

        return ring.epoch, holders

    # -- put ------------------------------------------------------------------
    def plan_put(self, req: pb.PutRequest) -> PutPlan:
        if not req.entries:
            raise InvalidArgument("put: entries is empty")
        if len(req.entries) > MAX_BATCH_ENTRIES:
            raise InvalidArgument(f"put: {len(req.entries)} entries, more than {MAX_BATCH_ENTRIES}")
        keys: list[StoreKey] = []
        sizes: list[int] = []
        costs: list[int] = []
        metas: list[bytes] = []
        for i, e in enumerate(req.entries):
            where = f"entries[{i}]"
            key = store_key(e.key, e.kind, where)
            meta = e.meta
            size = check_meta(meta, e.kind, where)
            version = e.version
            if version > MAX_VERSION:
                raise InvalidArgument(
                    f"{where}.version {version} exceeds the limit of {MAX_VERSION}"
                )
            if version and e.HasField("if_version"):
                raise InvalidArgument(f"{where}: a versioned write cannot be conditional")
            raw = meta.SerializeToString()  # bytes: a parsed message costs ~4x the RAM
            keys.append(key)
            sizes.append(size)
            costs.append(entry_cost(key[1], size, len(raw)))
            metas.append(raw)
        self._check_stamps(req)
        # After validation, so a stale-epoch refusal implies a header whose
        # sizes can be trusted (the data channel then skips its payload).
        self.check_epoch(req.epoch)
        if self.leaving and req.epoch == 0 and any(e.version for e in req.entries):
            raise Unavailable(f"node {self.name} is leaving the ring: push to the new owners")
        ring = self.rings.current
        # A client's pinned put beyond the quota is refused before its payload
        # arrives (commit checks again); a pushed copy never is (node/pins.py).
        if req.epoch and any(e.meta.pinned for e in req.entries):
            self.store.check_pins(
                [
                    NewEntry(k, b"", (), cost, pinned=True, pin_strict=True)
                    for k, e, cost in zip(keys, req.entries, costs, strict=True)
                    if e.meta.pinned
                ],
                "put",
            )
        reservation = self.store.reserve(sum(costs))
        return PutPlan(req, keys, sizes, costs, reservation, ring, metas)

    def finish_put(
        self,
        plan: PutPlan,
        chunks: Sequence[tuple[Buffer, ...]],
        crcs: Sequence[int],
    ) -> pb.PutReply:
        """Check every entry's checksum, then commit them all together."""
        if plan.req.epoch:  # a client's put (a push is background work)
            self.activity.touch()
        for i, e in enumerate(plan.req.entries):
            meta = e.meta
            if crcs[i] != meta.crc32c and not meta.stripes:  # manifests carry no bytes
                raise DataCorruption(
                    f"put: checksum mismatch for entries[{i}] ({e.key[:64]!r}): "
                    f"received crc32c {crcs[i]:#010x}, header says {meta.crc32c:#010x}"
                )
        entries = plan.req.entries
        assigned = [k for k, e in zip(plan.keys, entries, strict=True) if not e.version]
        known: dict[StoreKey, int] = {}
        if assigned:
            self.fencer.before_serving()
        if assigned and self.rings.in_window():
            # A key new here may have a version at its previous owners: the
            # version assigned must exceed it, and if_version must see it.
            lacking = [k for k in assigned if k[0] == pb.TENSOR and not self.store.contains(k)]
            if lacking:
                known = self.handoff.known_versions(lacking)
        stamp = max(self.epochs.epoch, plan.req.epoch)
        checked, holders = self._placed(plan)
        mine = frozenset((self.me,))
        items = [
            NewEntry(
                k,
                raw,  # serialized in plan_put
                c,
                cost,
                e.if_version if e.HasField("if_version") else None,
                version=e.version,
                stamp=e.stamp or stamp,
                known_version=known.get(k, 0),
                checked=checked,
                # An exact-version copy (a client's replica write, a push)
                # vouches only for this node: the client placed it with a
                # ring that may not be the one its primary write went by.
                holders=mine if e.version else holders(k[1]),
                pinned=e.meta.pinned,
                pin_strict=bool(plan.req.epoch),  # a client's write, not a moved copy
            )
            for k, e, c, cost, raw in zip(
                plan.keys, entries, chunks, plan.costs, plan.metas, strict=True
            )
        ]
        resent = self._resent(plan)
        # A pushed copy (explicit version) older than what was written or
        # deleted here since the ring changed is refused there (store floors).
        done = iter(
            self.store.commit(
                plan.reservation, [it for i, it in enumerate(items) if i not in resent]
            )
        )
        results = [(resent[i], None) if i in resent else next(done) for i in range(len(items))]
        if checked < self.rings.placement_epoch:
            self.rebalancer.dirty(plan.keys)  # the ring moved while it streamed in
        reply = pb.PutReply(epoch=self.epochs.epoch)
        for i, (key, e, (version, old)) in enumerate(zip(plan.keys, entries, results, strict=True)):
            if i in resent:
                reply.results.add(key=e.key, version=version)  # stored by its first send
                continue
            kept = bool(e.version) and version != e.version
            r = reply.results.add(key=e.key, version=version, kept_newer=kept)
            if old is not None and not old.chunks:  # a manifest (or an empty tensor)
                # Stripes the new value names too are not replaced: a resent
                # put (its first reply lost after the commit) replaces its own
                # first commit, and the client frees what is reported here.
                own = {ref.key for ref in e.meta.stripes}
                r.replaced_stripes.extend(
                    ref for ref in tensor_meta(old).stripes if ref.key not in own
                )
            if key[0] == pb.TENSOR:
                self.fills.committed(key[1])
                if not kept:
                    self.events.publish(key[1], version)
        return reply

    def _resent(self, plan: PutPlan) -> dict[int, int]:
        """Conditional entries this very put already stored: index -> their version.

        A client resends a put whose reply it did not get (the connection
        died after the commit: a reset, a black hole); a put is
        all-or-nothing, so that is safe, except that a conditional one would
        now find its own write and be refused as a conflict although it was
        stored. Its ``put_id`` (random per put) on the current value says it
        was: the first send's version is the answer. Only conditional
        entries are looked at (a peek and a parse each); an unconditional
        resend just stores the same value again.
        """
        out: dict[int, int] = {}
        for i, (key, e) in enumerate(zip(plan.keys, plan.req.entries, strict=True)):
            if e.version or not e.HasField("if_version") or not e.meta.put_id:
                continue
            current = self.store.peek(key)
            if current is not None and tensor_meta(current).put_id == e.meta.put_id:
                out[i] = current.version
        return out

    def abort_put(self, plan: PutPlan) -> None:
        self.store.release(plan.reservation)  # no-op after a commit

    # -- get / delete / stat ----------------------------------------------------
    def get(
        self, req: pb.GetRequest, *, local_ok: bool = False
    ) -> tuple[pb.GetReply, list[Entry], list[Entry]]:
        """Look keys up; every get is data-path activity (node/pace.py).

        A handoff too: another node's client waits on it (a miss at a new
        owner asks this node), so a scan here yields to it like to a get.
        """
        self.activity.begin()
        try:
            return self._get(req, local_ok)
        finally:
            self.activity.end()

    def _get(
        self, req: pb.GetRequest, local_ok: bool
    ) -> tuple[pb.GetReply, list[Entry], list[Entry]]:
        """Look keys up.

        Returns the reply header, the entries whose bytes follow it as payload
        (found and not a manifest), in order, and the entries answered with
        their addresses instead (``req.local`` on a transport that can pin
        them, ``local_ok``): the caller must keep those referenced until the
        client is done reading.
        """
        if len(req.keys) > MAX_BATCH_ENTRIES:
            raise InvalidArgument(f"get: {len(req.keys)} keys, more than {MAX_BATCH_ENTRIES}")
        if not req.handoff:  # a handoff is asked by a node at any epoch
            self.check_epoch(req.epoch)
            # What this node serves under its epoch must not be outdated by a
            # write that the key's old replicas still take under an older one
            # (node/fence.py): once per epoch, fenced before the first read.
            self.fencer.before_serving()
        keys = store_keys(req.keys, "keys")
        found = [self.store.get(key, demoted_ok=req.handoff) for key in keys]
        if not req.handoff and not all(found):
            handed = self.handoff.fetch(k for k, e in zip(keys, found, strict=True) if e is None)
            found = [
                e if e is not None else handed.get(k) or self.store.peek(k)
                for k, e in zip(keys, found, strict=True)
            ]  # peek: a push may have landed (and its sender dropped it) while we asked
        reply = pb.GetReply(epoch=self.epochs.epoch)
        payload: list[Entry] = []
        pinned: list[Entry] = []
        local = req.local and local_ok
        for k, key, entry in zip(req.keys, keys, found, strict=True):
            got = reply.entries.add(key=k.key, found=entry is not None)
            if entry is None:
                floor = self.store.floor(key) if req.handoff else 0
                if floor:  # written or deleted here since the change, then gone
                    got.settled, got.version = True, floor
                continue
            got.version = entry.version
            got.stamp = entry.stamp
            got.meta.MergeFromString(entry.meta)
            if not entry.chunks:
                continue
            if local and sum(len(c) for c in entry.chunks) >= LOCAL_MIN:
                for chunk in entry.chunks:
                    got.local.add(addr=address_of(chunk), nbytes=len(chunk))
                pinned.append(entry)
            else:
                payload.append(entry)
        return reply, payload, pinned

    def fill(self, req: pb.FillRequest) -> pb.FillReply:
        """Grant, refuse or end the right to load a missing key (see node/fill.py)."""
        self.check_epoch(req.epoch)
        kind, key = store_key(req.key, pb.TENSOR, "fill")
        if not req.holder or len(req.holder) > 128:
            raise InvalidArgument("fill.holder must be 1..128 characters")
        if len(req.filler) > 256:
            raise InvalidArgument("fill.filler must be at most 256 characters")
        if req.release:
            self.fills.release(key, req.holder)
            return pb.FillReply()
        if self.store.contains((kind, key)) or self.handoff.fetch([(kind, key)]):
            return pb.FillReply(found=True)
        if not 0 < req.ttl_ms <= MAX_FILL_TTL_MS:
            raise InvalidArgument(f"fill.ttl_ms must be 1..{MAX_FILL_TTL_MS}, got {req.ttl_ms}")
        a = self.fills.acquire(key, req.holder, req.ttl_ms / 1000, req.filler)
        if a.granted and self.store.contains((kind, key)):
            # A put committed between the look above and the grant (its
            # commit ended the previous holder's lease, so nothing refused
            # us): the key is there, nothing to load. A put commits in the
            # store before it ends leases (finish_put), so this second look
            # cannot miss it. Seen on a loaded host: two workers loaded.
            self.fills.release(key, req.holder)
            return pb.FillReply(found=True)
        return pb.FillReply(
            granted=a.granted,
            lease_left_ms=max(1, round(a.left_s * 1000)),
            holder=a.holder,
            filler=a.filler,
        )

    def delete(self, req: pb.DeleteRequest) -> pb.DeleteReply:
        self.check_epoch(req.epoch)
        keys = store_keys(req.keys, "keys")
        reply = pb.DeleteReply(epoch=self.epochs.epoch)
        # No handoff or push of a copy older than this delete may bring them
        # back: the tombstone is their floor (node/store.py).
        tombstone = self.store.tombstone()
        olds = [self.store.delete(key, tombstone=tombstone) for key in keys]
        for k, key, old in zip(req.keys, keys, olds, strict=True):
            r = reply.results.add(key=k.key, found=old is not None)
            if old is not None and not old.chunks:
                r.stripes.extend(tensor_meta(old).stripes)
            if key[0] == pb.TENSOR:
                self.events.publish(key[1], 0)
        return reply

    def pin(self, req: pb.PinRequest) -> pb.PinReply:
        """Pin or unpin every entry held under ``req.prefix`` (node/pins.py)."""
        self.check_epoch(req.epoch)
        if "\x00" in req.prefix or len(req.prefix.encode("utf-8")) > 1024:
            raise InvalidArgument("pin.prefix must be at most 1024 UTF-8 bytes with no NUL")
        entries, nbytes = self.store.pin_prefix(req.prefix, not req.unpin)
        return pb.PinReply(entries=entries, bytes=nbytes)

    def fence(self, req: pb.FenceRequest) -> pb.FenceReply:
        """Bring this node's ring up to ``req.epoch`` (from its router) before answering."""
        if req.epoch > self.epochs.epoch and self._sync is not None:
            self._sync(req.epoch)
        return pb.FenceReply(epoch=self.epochs.epoch)

    def stat(self) -> pb.NodeStats:
        s = self.store.stats()
        reply = pb.NodeStats(
            name=self.name,
            address=self.address,
            keys=s.entries_by_kind.get(pb.TENSOR, 0),
            shards=s.entries_by_kind.get(pb.SHARD, 0),
            bytes_used=s.bytes_used,
            bytes_reserved=s.bytes_reserved,
            capacity=s.capacity,
            hits=s.hits,
            misses=s.misses,
            evictions=s.evictions,
            puts=s.puts,
            deletes=s.deletes,
            policy=s.policy,
            epoch=self.epochs.epoch,
            fills=self.fills.grants,
            fill_waits=self.fills.waits,
            handoffs=self.handoff.handoffs,
            drained=self.rebalancer.drained,
            demoted=s.demoted,
            invalidated=s.invalidated,
            rereplicated=self.rebalancer.pushed,
            moved=s.moved,
            discarded=s.discarded,
            pending=self.rebalancer.pending,
            revived=s.revived,
            pinned_bytes=s.pinned_bytes,
            pinned_capacity=s.pinned_capacity,
            pinned=s.pinned,
            pins_dropped=s.pins_dropped,
        )
        if isinstance(self.store, TieredStore):
            disk_stats(self.store, reply)
        return reply

    def drain(self, fetch_ring: Callable[[], Ring | None], timeout_s: float) -> int:
        """SIGTERM: hand every entry to its replica set in the ring without this node.

        ``fetch_ring`` gives the router's newest ring (this node has left it).
        Returns the copies the new owners confirmed (node/rebalance.py).
        """
        start = time.monotonic()
        held = len(self.store.keys())
        n = self.rebalancer.drain(fetch_ring, timeout_s)
        log.info(
            "drained %d entries to their new owners (copies confirmed; %d held) in %.1fs",
            n,
            held,
            time.monotonic() - start,
        )
        return n

    def close(self) -> None:
        self.rebalancer.close()
        self.fencer.close()
        self.events.close()
