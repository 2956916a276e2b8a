"""Control-size operations over the data channel, on real processes.

``version``/``versions``, strict near-cache revalidation, ``delete`` and the
fill grants of ``get_or_load`` go over each node's data channel (GET
head_only, DELETE, FILL) when it is open, and over gRPC when it is not. The
nodes' own request counters (``tensorcache_node_requests_total{op, path}``)
say which door served each request, so these tests count what each call
cost there; near-cache revalidation of many keys must be one request per
node. Bad frames get an error frame naming the field and leave the
connection usable; a node's data channel that cannot be reached falls back
to gRPC, counted in ``data_fallbacks``. Grants on these ops: test_auth.py.
"""

from __future__ import annotations

import dataclasses
import socket
import threading
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

import tensorcache
from tensorcache.apps.cluster import LocalCluster
from tensorcache.client.config import ClientConfig
from tensorcache.client.items import DelItem, FillItem, GetItem
from tensorcache.client.nodes import NetworkTransport
from tensorcache.dataproto import FRAME, MAGIC, OP_DELETE, OP_FILL, OP_GET, frame
from tensorcache.proto import tensorcache_pb2 as pb
from tensorcache.ring import Ring
from tensorcache.wire import ring_from_snapshot

from .helpers import assert_same
from .nodecounts import counted, quiet_cluster

pytestmark = pytest.mark.integration

DATA = {"local_fastpath": False}
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with quiet_cluster(tmp_path_factory.mktemp("ctl")) as c:
        yield c


def _ring(cluster: LocalCluster) -> Ring:
    return ring_from_snapshot(cluster.ring())


def _owners(cluster: LocalCluster, keys: list[str]) -> int:
    ring = _ring(cluster)
    return len({ring.owner(k).name for k in keys})


def test_version_and_versions_are_served_by_the_data_channel(cluster, prefix):
    keys = [f"{prefix}v{i}" for i in range(24)]
    with tensorcache.connect(cluster.router_address, **DATA) as c:
        written = c.put_many({k: np.arange(i + 1) for i, k in enumerate(keys)})
        with counted(cluster) as one:
            assert c.version(keys[0]) == written[keys[0]]
            assert c.version(keys[1]) == written[keys[1]]
        with counted(cluster) as many:
            got = c.versions(keys)
        assert got == written
        # A miss is an answer too (the node may ask a previous owner first,
        # node to node, so it is left out of the counted blocks).
        assert c.versions([keys[0], f"{prefix}absent"]) == {
            keys[0]: written[keys[0]],
            f"{prefix}absent": None,
        }
        assert c.metrics().get("data_fallbacks", 0) == 0
    assert one == {("head", "data"): 2}
    # One head-only request per node that owns any of the keys, whatever their number.
    assert many == {("head", "data"): _owners(cluster, keys)}


def test_delete_and_fill_are_served_by_the_data_channel(cluster, prefix):
    key = f"{prefix}d"
    with tensorcache.connect(cluster.router_address, **DATA) as c:
        c.put(key, np.arange(5))
        with counted(cluster) as deleted:
            assert c.delete(key) is True
            assert c.delete(key) is False
        assert c.get(key) is None
        with counted(cluster) as filled:
            value = c.get_or_load(f"{prefix}f", lambda: np.arange(9))
        assert_same(value, np.arange(9))
        assert_same(c.get(f"{prefix}f"), np.arange(9))
        assert c.metrics().get("data_fallbacks", 0) == 0
    assert deleted == {("delete", "data"): 2}
    # The grant and its release are fills on the data channel; none went over
    # gRPC. (A miss may make the node ask a previous owner: a gRPC get between
    # nodes, not counted here.)
    assert filled.get(("fill", "data"), 0) >= 2
    assert filled.get(("fill", "grpc"), 0) == 0


def test_strict_near_cache_revalidates_many_hits_in_one_request_per_node(cluster, prefix):
    keys = [f"{prefix}n{i}" for i in range(30)]
    values = {k: np.full(64, i, dtype=np.float32) for i, k in enumerate(keys)}
    with tensorcache.connect(cluster.router_address, near_cache="4MiB", **DATA) as c:
        c.put_many(values)
        c.get_many(keys)  # fills the near-cache
        with counted(cluster) as single:
            assert_same(c.get(keys[0]), values[keys[0]])
        with counted(cluster) as batch:
            got = c.get_many(keys)
        for k in keys:
            assert_same(got[k], values[k])
        # A write elsewhere makes one copy stale: the batch check catches it.
        with tensorcache.connect(cluster.router_address) as other:
            other.put(keys[3], np.zeros(64, dtype=np.float32))
        assert_same(c.get_many(keys)[keys[3]], np.zeros(64, dtype=np.float32))
        m = c.metrics()
    assert single == {("head", "data"): 1}  # a version check; no bytes moved
    assert batch == {("head", "data"): _owners(cluster, keys)}
    assert m["near_hits"] >= 1 + 2 * len(keys) - 1
    assert m["near_stale"] == 1
    assert m.get("data_fallbacks", 0) == 0


def test_grpc_transport_still_serves_every_control_op(cluster, prefix):
    key = f"{prefix}g"
    with (
        tensorcache.connect(cluster.router_address, transport="grpc", near_cache="1MiB") as c,
        counted(cluster) as seen,
    ):
        v = c.put(key, np.arange(3))
        assert c.version(key) == v
        assert c.versions([key]) == {key: v}
        assert_same(c.get(key), np.arange(3))
        assert_same(c.get(key), np.arange(3))  # a near hit, revalidated over gRPC
        assert_same(c.get_or_load(f"{prefix}gf", lambda: np.arange(4)), np.arange(4))
        assert c.delete(key) is True
    assert not any(path == "data" and op != "put" for op, path in seen), seen
    assert seen[("delete", "grpc")] == 1 and seen[("fill", "grpc")] >= 2


# -------------------------------------------------------------- fallback
def _dead_address() -> str:
    """A loopback port nobody listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def test_unreachable_data_channel_falls_back_to_grpc(cluster, prefix):
    """The transport seam with a member whose data port refuses: every control op
    still works, over gRPC, and each fallback is counted."""
    key = f"{prefix}fb"
    with tensorcache.connect(cluster.router_address) as c:
        version = c.put(key, np.arange(6))
    ring = _ring(cluster)
    owner = dataclasses.replace(ring.owner(key), data_address=_dead_address())
    counts: dict[str, int] = {}

    def count(name: str, n: int = 1, **more: int) -> None:
        counts[name] = counts.get(name, 0) + n

    nodes = NetworkTransport(ClientConfig(timeout_s=10), count)
    try:
        with counted(cluster) as seen:
            heads = [GetItem(key, pb.TENSOR), GetItem(f"{prefix}none", pb.TENSOR)]
            nodes.head(owner, ring.epoch, heads)
            fill = FillItem(f"{prefix}fb-fill", "holder-1", "test", 5000, False, 10.0)
            nodes.fill(owner, ring.epoch, [fill])
            release = FillItem(f"{prefix}fb-fill", "holder-1", "test", 5000, True, 10.0)
            nodes.fill(owner, ring.epoch, [release])
            gone = [DelItem(key, pb.TENSOR)]
            nodes.delete(owner, ring.epoch, gone)
    finally:
        nodes.close()
    assert heads[0].found and heads[0].version == version and not heads[1].found
    assert fill.reply is not None and fill.reply.granted
    assert gone[0].found
    assert counts["data_fallbacks"] == 4
    assert seen[("fill", "grpc")] == 2 and seen[("delete", "grpc")] == 1
    assert seen[("head", "grpc")] >= 1  # the version check (and any node-to-node look)
    assert not any(path == "data" for _, path in seen), seen
    with tensorcache.connect(cluster.router_address) as c:
        assert c.get(key) is None


def test_a_node_without_the_new_ops_is_asked_over_grpc(cluster, prefix):
    """A node from before OP_DELETE/OP_FILL (a rolling upgrade) answers "unknown data
    channel op": the client falls back to gRPC for it and stops asking its data channel."""
    key = f"{prefix}old"
    with tensorcache.connect(cluster.router_address) as c:
        c.put(key, np.arange(2))
    ring = _ring(cluster)
    old = socket.create_server(("127.0.0.1", 0))
    served: list[int] = []

    def old_node() -> None:  # speaks the old contract: unknown ops are refused
        for _ in range(2):  # bounded: the client must not come back after the first
            try:
                conn, _ = old.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(10)
                got = b""
                while len(got) < len(MAGIC) + FRAME.size:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    got += chunk
                op = got[len(MAGIC)]
                served.append(op)
                msg = f"unknown data channel op {op}"
                err = pb.DataError(code=INVALID_ARGUMENT, message=msg)
                conn.sendall(frame(INVALID_ARGUMENT, err.SerializeToString()))

    thread = threading.Thread(target=old_node, daemon=True)
    thread.start()
    owner = dataclasses.replace(ring.owner(key), data_address=f"127.0.0.1:{old.getsockname()[1]}")
    counts: dict[str, int] = {}
    nodes = NetworkTransport(
        ClientConfig(timeout_s=10), lambda name, n=1, **_: counts.update({name: n})
    )
    try:
        first, second = [DelItem(key, pb.TENSOR)], [DelItem(key, pb.TENSOR)]
        nodes.delete(owner, ring.epoch, first)
        nodes.delete(owner, ring.epoch, second)
    finally:
        nodes.close()
        old.close()
        thread.join(10)
    assert first[0].found and not second[0].found
    assert served == [OP_DELETE]


# -------------------------------------------------------------- bad input
class Conn:
    def __init__(self, address: str) -> None:
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.sock.sendall(MAGIC)

    def ask(self, op: int, header: bytes) -> tuple[int, bytes]:
        self.sock.sendall(frame(op, header))
        return self.read()

    def read(self) -> tuple[int, bytes]:
        head = self._exact(FRAME.size)
        status, n = FRAME.unpack(head)
        return status, self._exact(n)

    def _exact(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            got = self.sock.recv(n - len(out))
            if not got:
                raise ConnectionError(f"closed after {len(out)} of {n} bytes")
            out += got
        return out

    def closed(self) -> bool:
        return self.sock.recv(1) == b""


BAD: list[tuple[str, int, bytes, str]] = [
    ("delete-garbage", OP_DELETE, b"\xff\xff\xff", "not a valid DeleteRequest"),
    (
        "delete-empty-key",
        OP_DELETE,
        pb.DeleteRequest(keys=[pb.EntryKey(key=b"")]).SerializeToString(),
        "keys[0]",
    ),
    (
        "delete-bad-utf8",
        OP_DELETE,
        pb.DeleteRequest(
            keys=[pb.EntryKey(key=b"ok"), pb.EntryKey(key=b"\xc3\x28")]
        ).SerializeToString(),
        "keys[1]",
    ),
    ("fill-garbage", OP_FILL, b"\x0a\xff", "not a valid FillRequest"),
    ("fill-no-holder", OP_FILL, pb.FillRequest(key=b"k", ttl_ms=10).SerializeToString(), "holder"),
    (
        "fill-ttl",
        OP_FILL,
        pb.FillRequest(key=b"k", holder="h", ttl_ms=0).SerializeToString(),
        "fill.ttl_ms",
    ),
]


@pytest.mark.parametrize(("op", "header", "names"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_control_request_names_the_field_and_keeps_the_connection(
    cluster, prefix, op, header, names
):
    key = f"{prefix}kept"
    with tensorcache.connect(cluster.router_address) as c:
        version = c.put(key, np.arange(4))
    member = _ring(cluster).owner(key)
    conn = Conn(member.data_address)
    try:
        status, body = conn.ask(op, header)
        assert status == INVALID_ARGUMENT
        err = pb.DataError.FromString(body)
        assert err.code == INVALID_ARGUMENT and names in err.message, err.message
        # Same connection, next request: answered (the stream stayed in step).
        head = pb.GetRequest(keys=[pb.EntryKey(key=key.encode())], head_only=True)
        status, body = conn.ask(OP_GET, head.SerializeToString())
        assert status == 0
        reply = pb.GetReply.FromString(body)
        assert reply.entries[0].found and reply.entries[0].version == version
    finally:
        conn.sock.close()
    with tensorcache.connect(cluster.router_address) as c:
        assert_same(c.get(key), np.arange(4))


def test_unknown_op_is_refused_and_closes_cleanly(cluster):
    conn = Conn(_ring(cluster).members[0].data_address)
    try:
        status, body = conn.ask(250, b"")
        assert status == INVALID_ARGUMENT
        assert "unknown data channel op 250" in pb.DataError.FromString(body).message
        assert conn.closed()
    finally:
        conn.sock.close()
