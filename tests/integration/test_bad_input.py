"""Malformed requests straight to a node: a precise status, and no harm done.

After every bad request the node must keep serving, hold nothing of the bad
put (no entry, no reservation) and still return every entry stored before.
"""

from __future__ import annotations

import contextlib
import socket
import time

import grpc
import numpy as np
import pytest

import tensorcache
from tensorcache.codec import crc32c
from tensorcache.proto import tensorcache_pb2 as pb

from .helpers import (
    assert_same,
    get_request,
    node_stat,
    poll,
    raw_delete,
    raw_get,
    raw_put,
    rpc_error,
    tensor_header,
)

pytestmark = pytest.mark.integration

PAYLOAD = bytes(range(256)) * 4  # 1 KiB


@pytest.fixture(scope="module")
def stored(cluster):
    """Entries on every node that no bad request may disturb."""
    vals = {f"resident/{i}": np.full(100 + i, i, dtype=np.int32) for i in range(40)}
    with tensorcache.connect(cluster.router_address) as c:
        c.put_many(vals)
        assert all(s.keys > 0 for s in c.stats()), "every node should hold a resident"
    return vals


@pytest.fixture
def node(cluster, stored, client, prefix):
    """The address of the node under attack; afterwards, check it is unharmed."""
    address = next(iter(cluster.nodes.values())).address
    before = node_stat(address)
    yield address

    def settled() -> pb.NodeStats | None:
        s = node_stat(address)
        return s if s.bytes_reserved == 0 else None

    after = poll(settled, what="the node's reservations to be released")
    assert after.keys == before.keys
    assert after.bytes_used == before.bytes_used
    assert after.evictions == before.evictions
    got = client.get_many(list(stored))
    for key, value in stored.items():
        assert_same(got[key], value)
    # ...and it still takes a well-formed put.
    key = (prefix + "ok").encode()
    raw_put(address, [tensor_header(key, PAYLOAD), PAYLOAD])
    reply, payload = raw_get(address, get_request(key))
    assert reply.entries[0].found and payload == PAYLOAD
    raw_delete(address, pb.DeleteRequest(keys=[pb.EntryKey(key=key)]))


def assert_not_stored(address: str, key: bytes) -> None:
    reply, payload = raw_get(address, get_request(key))
    assert not reply.entries[0].found and payload == b""


def put_error(address: str, messages: list[bytes]) -> grpc.RpcError:
    return rpc_error(lambda: raw_put(address, messages))


@pytest.mark.parametrize(
    "header",
    [
        b"\x12\x10abc",  # field 2, 16 bytes promised, 3 present
        b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",  # varint longer than 10 bytes
        b"\xff\xff\xff\xff",  # field number 0 / bad wire type
    ],
    ids=["truncated", "overlong-varint", "bad-tag"],
)
def test_garbage_header(node, header):
    err = put_error(node, [header, PAYLOAD])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "PutRequest" in err.details()


def test_header_without_entries(node):
    err = put_error(node, [pb.PutRequest(epoch=0).SerializeToString()])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "entries" in err.details()


def test_empty_stream(node):
    err = put_error(node, [])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "header" in err.details()


def test_unknown_dtype(node, prefix):
    key = (prefix + "k").encode()
    err = put_error(node, [tensor_header(key, PAYLOAD, dtype="<q9"), PAYLOAD])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "dtype" in err.details() and "<q9" in err.details()
    assert_not_stored(node, key)


@pytest.mark.parametrize(
    "dtype", ["|O", "f4", "<i4,<i4"], ids=["object", "non-canonical", "struct"]
)
def test_refused_dtypes(node, prefix, dtype):
    key = (prefix + "k").encode()
    err = put_error(node, [tensor_header(key, PAYLOAD, dtype=dtype, shape=[128]), PAYLOAD])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "dtype" in err.details()
    assert_not_stored(node, key)


def test_shape_and_nbytes_disagree(node, prefix):
    key = (prefix + "k").encode()
    err = put_error(node, [tensor_header(key, PAYLOAD, dtype="<f4", shape=[100]), PAYLOAD])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "nbytes" in err.details()
    assert_not_stored(node, key)


def test_bad_order_and_kind(node, prefix):
    key = (prefix + "k").encode()
    req = pb.PutRequest.FromString(tensor_header(key, PAYLOAD))
    req.entries[0].meta.order = "X"
    err = put_error(node, [req.SerializeToString(), PAYLOAD])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "order" in err.details()
    err = put_error(node, [tensor_header(key, PAYLOAD, kind=7), PAYLOAD])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "kind" in err.details()
    assert_not_stored(node, key)


@pytest.mark.parametrize(
    "payload",
    [[PAYLOAD[:-1]], [PAYLOAD[:100], PAYLOAD[100:-10]], [], [PAYLOAD, b"x"], [PAYLOAD + b"xyz"]],
    ids=["one-short", "split-short", "none", "extra-message", "long"],
)
def test_payload_length_differs_from_header(node, prefix, payload):
    key = (prefix + "k").encode()
    err = put_error(node, [tensor_header(key, PAYLOAD), *payload])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "payload" in err.details()
    assert_not_stored(node, key)


def test_wrong_checksum(node, prefix):
    key = (prefix + "k").encode()
    err = put_error(node, [tensor_header(key, PAYLOAD, crc=crc32c(PAYLOAD) ^ 1), PAYLOAD])
    assert err.code() == grpc.StatusCode.DATA_LOSS
    assert "checksum" in err.details()
    assert_not_stored(node, key)


def test_batch_with_one_bad_checksum_stores_nothing(node, prefix):
    good, bad = (prefix + "good").encode(), (prefix + "bad").encode()
    req = pb.PutRequest.FromString(tensor_header(good, PAYLOAD))
    wrong = pb.PutRequest.FromString(tensor_header(bad, PAYLOAD, crc=0))
    req.entries.append(wrong.entries[0])
    err = put_error(node, [req.SerializeToString(), PAYLOAD, PAYLOAD])
    assert err.code() == grpc.StatusCode.DATA_LOSS
    assert_not_stored(node, good)
    assert_not_stored(node, bad)


def manifest(key: bytes, nbytes: int, stripes: list[tuple[int, int]], shape=None) -> bytes:
    meta = pb.TensorMeta(
        dtype="|u1", shape=[nbytes] if shape is None else shape, order="C", nbytes=nbytes, put_id=1
    )
    for i, (offset, size) in enumerate(stripes):
        meta.stripes.add(
            key=key + b"\x00" + b"%016x" % 1 + b"\x00%d" % i, offset=offset, nbytes=size
        )
    return pb.PutRequest(entries=[pb.EntryPut(key=key, meta=meta)]).SerializeToString()


@pytest.mark.parametrize(
    "stripes",
    [
        [(0, 100)],
        [(0, 100), (100, 100)],
        [(0, 100), (150, 150)],
        [(0, 200), (100, 200)],
        [(0, 0), (0, 300)],
    ],
    ids=["short", "short-two", "gap", "overlap", "empty-stripe"],
)
def test_manifest_stripes_must_cover_nbytes(node, prefix, stripes):
    key = (prefix + "m").encode()
    err = put_error(node, [manifest(key, 300, stripes)])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "stripes" in err.details()
    assert_not_stored(node, key)


def test_manifest_may_not_carry_payload_or_be_a_shard(node, prefix):
    key = (prefix + "m").encode()
    err = put_error(node, [manifest(key, 300, [(0, 300)]), b"x"])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    req = pb.PutRequest.FromString(manifest(key, 300, [(0, 300)]))
    req.entries[0].kind = pb.SHARD
    err = put_error(node, [req.SerializeToString()])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert_not_stored(node, key)


def test_manifest_with_missing_stripes_reads_as_a_miss(cluster, node, client, prefix):
    # A well-formed manifest whose stripes were never written (or were evicted).
    key = prefix + "m"
    for proc in cluster.nodes.values():
        raw_put(proc.address, [manifest(key.encode(), 300, [(0, 100), (100, 200)])])
    assert client.get(key) is None
    assert client.get_many([key]) == {key: None}
    for proc in cluster.nodes.values():
        raw_delete(proc.address, pb.DeleteRequest(keys=[pb.EntryKey(key=key.encode())]))


def test_garbage_get_request(node):
    err = rpc_error(lambda: raw_get(node, b"\x12\x10abc"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "GetRequest" in err.details()
    err = rpc_error(lambda: raw_get(node, get_request(b"k", kind=9)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "kind" in err.details()


def test_garbage_delete_request(node):
    with grpc.insecure_channel(node) as ch:
        delete = ch.unary_unary(
            "/tensorcache.v1.Node/Delete", request_serializer=None, response_deserializer=None
        )
        err = rpc_error(lambda: delete(b"\x12\x10abc", timeout=10))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_manifest_of_impossible_size(cluster, client, prefix):
    """Each dimension is valid on its own; their product overflows the address space."""
    key = prefix + "huge"
    huge = manifest(key.encode(), 2**63, [(0, 2**63)], shape=[2**32, 2**31])
    accepted = []
    for proc in cluster.nodes.values():
        try:
            raw_put(proc.address, [huge])
            accepted.append(proc.address)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
    try:
        if accepted:  # then a reader must not crash with a non-tensorcache error
            try:
                got = client.get(key)
            except tensorcache.TensorCacheError:
                got = None
            assert got is None
    finally:
        for address in accepted:
            raw_delete(address, pb.DeleteRequest(keys=[pb.EntryKey(key=key.encode())]))


# ------------------------------------------------------------------ raw TCP
def _closed_or_goaway(sock: socket.socket, timeout: float) -> bool:
    """Read until EOF or an HTTP/2 GOAWAY frame (type 7) arrives; False on timeout."""
    deadline = time.monotonic() + timeout
    buf = b""
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            data = sock.recv(65536)
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
        if not data:
            return True
        buf += data
        pos = 0
        while len(buf) - pos >= 9:  # walk whole frames: 3-byte length, type, flags, stream
            length = int.from_bytes(buf[pos : pos + 3], "big")
            if buf[pos + 3] == 7:
                return True
            pos += 9 + length
    return False


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_bytes_on_the_port(node, seed):
    host, port = node.rsplit(":", 1)
    junk = np.random.default_rng(seed).bytes(4096)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        # The server may hang up before reading it all: that is the point.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(junk)
        assert _closed_or_goaway(sock, timeout=10), "the server kept a junk connection open"
