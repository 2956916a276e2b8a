"""The TCP data channel, spoken by hand from its contract in proto/tensorcache.proto.

    connection start:  b"TCD1"
    request:   u8 op (1 PUT, 2 GET) | u32 len (little-endian) | header | payload
    response:  u8 status (0 ok, else a gRPC code) | u32 len | header | payload

A malformed frame gets a DataError frame and the connection is closed; a GET
error keeps the connection. After every bad request the node must keep
serving, hold nothing of the bad put and return every entry stored before.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

import tensorcache
from tensorcache.codec import crc32c
from tensorcache.proto import tensorcache_pb2 as pb
from tensorcache.wire import ring_from_snapshot

from .helpers import assert_same, get_request, node_stat, poll, raw_delete, tensor_header

pytestmark = pytest.mark.integration

MAGIC = b"TCD1"
FRAME = struct.Struct("<BI")
OP_PUT, OP_GET = 1, 2
PAYLOAD = bytes(range(256)) * 4  # 1 KiB
OK = 0
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION.value[0]
RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
DATA_LOSS = grpc.StatusCode.DATA_LOSS.value[0]


class DataSocket:
    """One data-channel connection, with a deadline on every read."""

    def __init__(self, address: str, *, magic: bytes | None = MAGIC) -> None:
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        if magic is not None:
            self.sock.sendall(magic)

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        # The node may refuse and hang up before reading everything we send.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.sock.sendall(data)

    def request(self, op: int, header: bytes, payload: bytes = b"") -> None:
        self.send(FRAME.pack(op, len(header)) + header + payload)

    def read_exact(self, n: int) -> bytes | None:
        buf = b""
        while len(buf) < n:
            try:
                got = self.sock.recv(n - len(buf))
            except ConnectionResetError:
                got = b""
            if not got:
                if buf:
                    pytest.fail(f"connection closed mid-frame after {buf!r}")
                return None
            buf += got
        return buf

    def response(self) -> tuple[int, bytes] | None:
        """The next response frame, or None if the node closed the connection."""
        head = self.read_exact(FRAME.size)
        if head is None:
            return None
        status, length = FRAME.unpack(head)
        body = self.read_exact(length) if length else b""
        assert body is not None, "connection closed inside a frame"
        return status, body

    def error(self, code: int) -> pb.DataError:
        got = self.response()
        assert got is not None, "the node closed the connection without an answer"
        status, body = got
        err = pb.DataError.FromString(body)
        assert (status, err.code) == (code, code), err
        return err

    def closed(self) -> bool:
        return self.response() is None


@pytest.fixture(scope="module")
def stored(cluster):
    vals = {f"resident/{i}": np.full(100 + i, i, dtype=np.int32) for i in range(40)}
    with tensorcache.connect(cluster.router_address) as c:
        c.put_many(vals)
        assert all(s.keys > 0 for s in c.stats())
    return vals


@pytest.fixture
def member(cluster, stored, client, prefix) -> Iterator[pb.Member]:
    """The ring member under attack; afterwards, check it is unharmed."""
    m = next(m for m in cluster.ring().members if m.name == "node-0")
    assert m.data_address, "the node advertises no data channel"
    before = node_stat(m.address)
    yield m

    def settled() -> pb.NodeStats | None:
        s = node_stat(m.address)
        return s if s.bytes_reserved == 0 else None

    after = poll(settled, what="the node's reservations to be released")
    assert (after.keys, after.bytes_used, after.evictions) == (
        before.keys,
        before.bytes_used,
        before.evictions,
    )
    got = client.get_many(list(stored))
    for key, value in stored.items():
        assert_same(got[key], value)
    # ...and the data channel still takes a well-formed put and get (of a
    # key this node owns: a ring change would drop a misplaced one).
    ring = ring_from_snapshot(cluster.ring())
    key = next(
        k.encode()
        for k in (f"{prefix}ok/{i}" for i in range(10_000))
        if ring.owner(k).name == m.name
    )
    ds = DataSocket(m.data_address)
    try:
        ds.request(OP_PUT, tensor_header(key, PAYLOAD), PAYLOAD)
        status, body = ds.response() or (None, b"")
        assert status == OK, body
        ds.request(OP_GET, get_request(key).SerializeToString())
        status, body = ds.response() or (None, b"")
        assert status == OK
        assert pb.GetReply.FromString(body).entries[0].found
        assert ds.read_exact(len(PAYLOAD)) == PAYLOAD
    finally:
        ds.close()
    raw_delete(m.address, pb.DeleteRequest(keys=[pb.EntryKey(key=key)]))


def assert_not_stored(m: pb.Member, key: bytes) -> None:
    ds = DataSocket(m.data_address)
    try:
        ds.request(OP_GET, get_request(key).SerializeToString())
        status, body = ds.response() or (None, b"")
        assert status == OK
        assert not pb.GetReply.FromString(body).entries[0].found
    finally:
        ds.close()


def test_round_trip_by_hand(member, stored, client, prefix):
    """The framing helpers here agree with the node (so the failures below mean something)."""
    key = (prefix + "k").encode()
    ds = DataSocket(member.data_address)
    try:
        ds.request(OP_PUT, tensor_header(key, PAYLOAD), PAYLOAD)
        status, body = ds.response() or (None, b"")
        assert status == OK
        reply = pb.PutReply.FromString(body)
        assert reply.results[0].key == key and reply.results[0].version > 0
        # Two GETs on one connection: a connection carries any number of requests.
        for _ in range(2):
            ds.request(OP_GET, get_request(key).SerializeToString())
            status, body = ds.response() or (None, b"")
            assert status == OK
            got = pb.GetReply.FromString(body).entries[0]
            assert got.found and got.meta.nbytes == len(PAYLOAD)
            assert ds.read_exact(len(PAYLOAD)) == PAYLOAD
            assert got.meta.crc32c == crc32c(PAYLOAD)
    finally:
        ds.close()
    # The client reads what was written by hand (if this node owns the key).
    value = client.get(prefix + "k")
    if value is not None:
        assert value.tobytes() == PAYLOAD
    raw_delete(member.address, pb.DeleteRequest(keys=[pb.EntryKey(key=key)]))


@pytest.mark.parametrize(
    "first",
    [b"TCD2", b"GET / HTTP/1.1\r\n\r\n", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"],
    ids=["magic-v2", "http1", "http2-preface"],
)
def test_wrong_magic(member, first):
    ds = DataSocket(member.data_address, magic=None)
    try:
        ds.send(first)
        err = ds.error(INVALID_ARGUMENT)
        assert "magic" in err.message
        assert ds.closed()
    finally:
        ds.close()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_bytes(member, seed):
    ds = DataSocket(member.data_address, magic=None)
    try:
        ds.send(np.random.default_rng(seed).bytes(4096))
        got = ds.response()
        if got is not None:  # an error frame, then the close
            assert got[0] != OK
            assert ds.closed()
    finally:
        ds.close()


def test_unknown_op(member):
    ds = DataSocket(member.data_address)
    try:
        ds.request(9, b"")
        assert "op" in ds.error(INVALID_ARGUMENT).message
        assert ds.closed()
    finally:
        ds.close()


def test_oversized_frame_header(member):
    ds = DataSocket(member.data_address)
    try:
        ds.send(FRAME.pack(OP_PUT, 0xFFFFFFFF))  # 4 GiB of "header": refused unread
        ds.error(INVALID_ARGUMENT)
        assert ds.closed()
    finally:
        ds.close()


@pytest.mark.parametrize(
    ("header", "words"),
    [
        (b"\x12\x10abc", ["PutRequest"]),
        (pb.PutRequest().SerializeToString(), ["entries"]),
        (tensor_header(b"k", PAYLOAD, dtype="<q9"), ["dtype", "<q9"]),
        (tensor_header(b"k", PAYLOAD, dtype="<f4", shape=[100]), ["nbytes"]),
        (tensor_header(b"\xff\xfe", PAYLOAD), ["UTF-8"]),
    ],
    ids=["garbage", "no-entries", "unknown-dtype", "nbytes-mismatch", "non-utf8-key"],
)
def test_bad_put_header(member, header, words):
    ds = DataSocket(member.data_address)
    try:
        ds.request(OP_PUT, header, PAYLOAD)
        err = ds.error(INVALID_ARGUMENT)
        for word in words:
            assert word in err.message
        assert ds.closed()  # the stream may hold payload the node will not read
    finally:
        ds.close()
    assert_not_stored(member, b"k")


def test_wrong_checksum(member, prefix):
    key = (prefix + "k").encode()
    ds = DataSocket(member.data_address)
    try:
        ds.request(OP_PUT, tensor_header(key, PAYLOAD, crc=crc32c(PAYLOAD) ^ 1), PAYLOAD)
        assert "checksum" in ds.error(DATA_LOSS).message
    finally:
        ds.close()
    assert_not_stored(member, key)


def test_payload_shorter_than_declared(member, prefix):
    key = (prefix + "k").encode()
    ds = DataSocket(member.data_address)
    try:
        ds.request(OP_PUT, tensor_header(key, PAYLOAD), PAYLOAD[:-100])
        ds.sock.shutdown(socket.SHUT_WR)  # the writer is done: the node sees EOF mid-payload
        got = ds.response()
        assert got is None or got[0] != OK
    finally:
        ds.close()
    assert_not_stored(member, key)


def test_stale_epoch(member, prefix):
    key = (prefix + "k").encode()
    current = node_stat(member.address).epoch
    ds = DataSocket(member.data_address)
    try:
        ds.request(OP_PUT, tensor_header(key, PAYLOAD, epoch=1), PAYLOAD)
        err = ds.error(FAILED_PRECONDITION)
        assert err.epoch >= current  # tells the client which epoch to catch up to
    finally:
        ds.close()
    assert_not_stored(member, key)


def test_value_above_capacity_is_refused_before_its_payload(member, prefix):
    key = (prefix + "k").encode()
    n = 4 * 1024**3  # more than the node's 1 GiB
    ds = DataSocket(member.data_address)
    try:
        ds.request(OP_PUT, tensor_header(key, b"", shape=[n], nbytes=n, crc=0))
        assert "capacity" in ds.error(RESOURCE_EXHAUSTED).message
    finally:
        ds.close()


def test_get_error_keeps_the_connection(member, stored):
    ds = DataSocket(member.data_address)
    try:
        ds.request(OP_GET, get_request(b"\xff\xfe").SerializeToString())
        assert "UTF-8" in ds.error(INVALID_ARGUMENT).message
        ds.request(OP_GET, b"\x12\x10abc")
        assert "GetRequest" in ds.error(INVALID_ARGUMENT).message
        ds.request(OP_GET, get_request(b"absent").SerializeToString())
        status, body = ds.response() or (None, b"")
        assert status == OK and not pb.GetReply.FromString(body).entries[0].found
    finally:
        ds.close()


def test_idle_connections_do_not_lock_clients_out(cluster, prefix):
    member = next(m for m in cluster.ring().members if m.name == "node-0")
    host, port = member.data_address.rsplit(":", 1)
    idle: list[socket.socket] = []
    try:
        for _ in range(300):  # port scanners, half-open clients: they send nothing
            idle.append(socket.create_connection((host, int(port)), timeout=10))
        with tensorcache.connect(cluster.router_address) as c:
            keys = {f"{prefix}{i}": np.arange(i, i + 10) for i in range(30)}  # on every node
            c.put_many(keys)
            got = c.get_many(list(keys))
            for key, value in keys.items():
                assert_same(got[key], value)
    finally:
        for s in idle:
            s.close()
        poll(lambda: data_channel_answers(member), what="the data channel to take connections")


def data_channel_answers(m: pb.Member) -> bool:
    ds = DataSocket(m.data_address)
    try:
        ds.request(OP_GET, get_request(b"absent").SerializeToString())
        got = ds.response()
        return got is not None and got[0] == OK
    finally:
        ds.close()
