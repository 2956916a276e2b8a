"""An in-memory cluster for tests: the real client over real node logic, no sockets.

``FakeCluster`` runs one ``NodeOps`` per member (the node's own logic: store,
versions, demotion, handoff, fills, invalidation) in this process and
plugs into the client's two seams, the node transport (client/nodes.py) and
the router (client/transport.py ``RouterTransport``). So a ``Client`` from
``FakeCluster.connect()`` places, stripes, fails over, confirms misses at a
replica and makes conditional puts exactly as against a real cluster, with
membership changes and dead nodes under the test's control::

    from tensorcache.testing import FakeCluster

    with FakeCluster(["a", "b", "c"], replicas=2) as cluster:
        c = cluster.connect(stripe_size="64KiB")
        c.put("w", np.ones(100_000, np.float32))
        cluster.kill("a")  # its calls now fail with Unavailable
        assert c.get("w") is not None  # from the other replica

What it leaves out: bytes never cross a socket (the data channel, gRPC
streams and co-located reads are the network transport's, tested against
real processes), watch-mode near-caches (no event stream), and time (node
scans run when the test calls ``settle()``, not in the background).

This module sits above the client and the node (it wires them together), so
the core never imports it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from tensorcache import codec
from tensorcache.client.api import Client
from tensorcache.client.config import ClientConfig
from tensorcache.client.items import (
    DelItem,
    FillItem,
    GetItem,
    PutItem,
    apply_delete_reply,
    apply_head_reply,
    apply_put_reply,
    check_payloads,
    delete_request,
    fill_request,
    get_request,
    payload_destinations,
    put_request,
)
from tensorcache.errors import Unavailable
from tensorcache.node.hot import hot_keys
from tensorcache.node.ops import EpochView, NodeOps
from tensorcache.node.payload import split_payload
from tensorcache.node.rings import RingView
from tensorcache.node.store import Store
from tensorcache.proto import tensorcache_pb2 as pb
from tensorcache.ring import Ring, RingMember
from tensorcache.sizes import parse_size

__all__ = ["FakeCluster"]

DEFAULT_CAPACITY = 256 * 1024 * 1024
DEFAULT_STRIPE = 8 * 1024 * 1024


class FakeCluster:
    """Named in-memory nodes, a ring with epochs, and faults on demand."""

    def __init__(
        self,
        nodes: Sequence[str] | int = 3,
        *,
        replicas: int = 1,
        capacity: int | str = DEFAULT_CAPACITY,
        stripe_size: int | str = DEFAULT_STRIPE,
        policy: str = "lru",
    ) -> None:
        names = [f"node-{i}" for i in range(nodes)] if isinstance(nodes, int) else list(nodes)
        if not names:
            raise ValueError("a FakeCluster needs at least one node")
        if replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {replicas}")
        self.replicas = replicas
        self.capacity = parse_size(capacity)
        self.stripe_size = parse_size(stripe_size)
        self.policy = policy
        self._lock = threading.RLock()
        self._epoch = 1000
        self._nodes: dict[str, NodeOps] = {}
        self._members: dict[str, RingMember] = {}
        self._down: set[str] = set()
        self._invalidations: dict[str, int] = {}
        self._ring = Ring(self._epoch, [], replicas=replicas)
        self._peers = _Peers(self)
        self.transport = _Nodes(self)
        self.router = _Router(self)
        self._clients: list[Client] = []
        for name in names:
            self._start(name)
        self._publish()

    # -- the test's controls ------------------------------------------------------------
    def connect(self, **options: Any) -> Client:
        """A client of this cluster (options: ClientConfig fields, sizes as "64KiB")."""
        if "stripe_size" in options:
            options["stripe_size"] = parse_size(options["stripe_size"])
        if "near_cache" in options:
            options["near_cache_bytes"] = parse_size(options.pop("near_cache"))
        client = Client(
            self.router.address,
            ClientConfig(**options),
            nodes=self.transport,
            control=self.router,
        )
        self._clients.append(client)
        return client

    @property
    def ring(self) -> Ring:
        return self._ring

    def node(self, name: str) -> NodeOps:
        """A member's node logic (stats: ``node(name).stat()``)."""
        return self._nodes[name]

    def add_node(self, name: str) -> None:
        """A node joins (a new, empty incarnation if it was here before)."""
        with self._lock:
            if name in self._members:
                raise ValueError(f"{name} is already a member")
            self._start(name)
            self._publish()

    def remove_node(self, name: str, *, drain: bool = True) -> None:
        """A node leaves the ring; with ``drain`` it hands its entries over first."""
        with self._lock:
            ops = self._nodes[name]
            del self._members[name]
            self._publish()
        if drain:
            ops.leaving = True
            ops.drain(lambda: self._ring, timeout_s=30.0)
        with self._lock:
            self._nodes.pop(name, None)
            ops.close()

    def kill(self, name: str) -> None:
        """The node stops answering (calls to it raise Unavailable); it stays in the
        ring until ``remove_node(name, drain=False)``, as until its lease expires."""
        with self._lock:
            if name not in self._nodes:
                raise KeyError(name)
            self._down.add(name)

    def settle(self) -> int:
        """Run every live node's rebalance scan once; returns the copies pushed."""
        live = [ops for name, ops in self._nodes.items() if name not in self._down]
        return sum(ops.rebalancer.scan_now() for ops in live)

    def close(self) -> None:
        for client in self._clients:
            client.close()
        for ops in self._nodes.values():
            ops.close()

    def __enter__(self) -> FakeCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------
    def _start(self, name: str) -> None:
        rings = RingView(name)
        store = Store(self.capacity, self.policy, stale=rings.stale, judge=rings)
        self._epoch += 1
        incarnation = self._epoch
        address = f"fake://{name}/{incarnation}"
        self._nodes[name] = NodeOps(
            store,
            name,
            address,
            EpochView(),
            rings=rings,
            peers=self._peers,
            sync=lambda _epoch: self._install(name),
            rereplicate=False,  # settle() runs the scans
            incarnation=incarnation,
        )
        self._members[name] = RingMember(name, address, self.capacity, incarnation=incarnation)
        self._down.discard(name)

    def _publish(self) -> None:
        """A new ring epoch: every live node installs it (as a heartbeat would tell)."""
        self._epoch += 1
        self._ring = Ring(
            self._epoch,
            list(self._members.values()),
            replicas=self.replicas,
            invalidations=self._invalidations,
        )
        for name in list(self._nodes):
            self._install(name)

    def _install(self, name: str) -> None:
        ops = self._nodes.get(name)
        if ops is not None:
            ops.install_ring(self._ring)
            ops.epochs.update(self._ring.epoch)

    def _invalidate(self, prefix: str) -> int:
        with self._lock:
            self._invalidations[prefix] = self._epoch + 1
            self._publish()
            return self._ring.epoch

    def _ops(self, member: RingMember | str) -> NodeOps:
        name = member if isinstance(member, str) else member.name
        with self._lock:
            ops = self._nodes.get(name)
            if ops is None or name in self._down:
                raise Unavailable(f"fake node {name} is down")
            return ops

    def _by_address(self, address: str) -> NodeOps:
        for name, ops in list(self._nodes.items()):
            if ops.address == address:
                return self._ops(name)
        raise Unavailable(f"no fake node at {address}")


class _Router:
    """The control plane (client/transport.py ``RouterTransport``)."""

    address = "fake-router:0"

    def __init__(self, cluster: FakeCluster) -> None:
        self._cluster = cluster

    def get_ring(self, timeout_s: float) -> pb.RingSnapshot:
        ring = self._cluster.ring
        return pb.RingSnapshot(
            epoch=ring.epoch,
            members=[
                pb.Member(
                    name=m.name, address=m.address, capacity=m.capacity, incarnation=m.incarnation
                )
                for m in ring.members
            ],
            stripe_size=self._cluster.stripe_size,
            vnodes=ring.vnodes,
            weight_unit=ring.weight_unit,
            replicas=ring.replicas,
            invalidations=[
                pb.Invalidation(prefix=p, epoch=e) for p, e in ring.invalidations.items()
            ],
        )

    def invalidate(self, prefix: str, timeout_s: float) -> int:
        return self._cluster._invalidate(prefix)

    def close(self) -> None:
        pass


def _put(ops: NodeOps, request: pb.PutRequest, chunks: Sequence[tuple[bytes, ...]]) -> pb.PutReply:
    plan = ops.plan_put(request)
    try:
        crcs = [codec.crc32c(b"".join(c)) if c else 0 for c in chunks]
        return ops.finish_put(plan, chunks, crcs)
    finally:
        ops.abort_put(plan)


class _Nodes:
    """Calls to nodes (client/nodes.py ``NodeTransport``), straight into NodeOps."""

    def __init__(self, cluster: FakeCluster) -> None:
        self._cluster = cluster

    def put(self, member: RingMember, epoch: int, batch: list[PutItem]) -> None:
        request, _ = put_request(epoch, batch)
        chunks = [(it.view.tobytes(),) if it.view is not None else () for it in batch]
        reply = _put(self._cluster._ops(member), request, chunks)
        apply_put_reply(batch, reply, f"fake node {member.name}")

    def get(self, member: RingMember, epoch: int, batch: list[GetItem]) -> None:
        where = f"get from fake node {member.name}"
        reply, payload, _ = self._cluster._ops(member).get(get_request(epoch, batch))
        carrying, _shared = payload_destinations(batch, reply, where)
        crcs = []
        for it, entry in zip(carrying, payload, strict=True):
            data = b"".join(bytes(c) for c in entry.chunks)
            assert it.dest is not None
            if data and len(data) == it.dest.nbytes:
                np.copyto(it.dest, np.frombuffer(data, np.uint8))
            crcs.append(codec.crc32c(data))
        check_payloads(carrying, crcs)

    def head(self, member: RingMember, epoch: int, batch: list[GetItem]) -> None:
        reply, _, _ = self._cluster._ops(member).get(get_request(epoch, batch, head_only=True))
        apply_head_reply(batch, reply, f"fake node {member.name}")

    def delete(self, member: RingMember, epoch: int, batch: list[DelItem]) -> None:
        reply = self._cluster._ops(member).delete(delete_request(epoch, batch))
        apply_delete_reply(batch, reply, f"fake node {member.name}")

    def fill(self, member: RingMember, epoch: int, batch: list[FillItem]) -> None:
        ops = self._cluster._ops(member)
        for it in batch:
            it.reply = ops.fill(fill_request(epoch, it))

    def fence(self, member: RingMember, epoch: int, timeout_s: float) -> int | None:
        try:
            ops = self._cluster._ops(member)
        except Unavailable:
            return None
        return ops.fence(pb.FenceRequest(epoch=epoch)).epoch

    def stat(
        self, member: RingMember, timeout_s: float, request: pb.StatRequest | None = None
    ) -> pb.NodeStats:
        ops = self._cluster._ops(member)
        reply = ops.stat()
        if request is not None and request.hot_keys:
            hot_keys(ops.store, request.hot_keys, reply)
        return reply

    def pin(self, member: RingMember, request: pb.PinRequest, timeout_s: float) -> pb.PinReply:
        return self._cluster._ops(member).pin(request)

    def close(self) -> None:
        pass


class _Peers:
    """Node-to-node calls (node/peers.py ``Peers``) between the fake's nodes."""

    def __init__(self, cluster: FakeCluster) -> None:
        self._cluster = cluster

    def get(
        self, address: str, request: pb.GetRequest, timeout: float
    ) -> tuple[pb.GetReply, list[bytes]]:
        reply, payload, _ = self._cluster._by_address(address).get(request)
        messages = [] if request.head_only else [bytes(c) for e in payload for c in e.chunks]
        return reply, messages

    def put(
        self, address: str, request: pb.PutRequest, payload: Iterable[bytes], timeout: float
    ) -> pb.PutReply:
        ops = self._cluster._by_address(address)
        sizes = [0 if e.meta.stripes else e.meta.nbytes for e in request.entries]
        chunks, _ = split_payload(payload, sizes)
        return _put(ops, request, [tuple(bytes(x) for x in c) for c in chunks])

    def fence(self, address: str, epoch: int, timeout: float) -> int:
        return self._cluster._by_address(address).fence(pb.FenceRequest(epoch=epoch)).epoch
