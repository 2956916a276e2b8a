"""A writer that dies mid-put leaves nothing behind: no entry, no reserved bytes."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

import tensorcache
from tensorcache.apps.cluster import LocalCluster

from .helpers import assert_same, poll, raw_put, read_line, settled, tensor_header

pytestmark = pytest.mark.integration

MIB = 1024 * 1024

# A real client putting one 256 MiB entry over gRPC in 4 KiB messages: seconds
# on the wire, so the test reliably kills it mid-put (the data channel would
# move it in a fraction of a second).
PUBLIC_WRITER = textwrap.dedent(
    """
    import sys
    import numpy as np
    import tensorcache
    router, key = sys.argv[1], sys.argv[2]
    value = np.full(256 * 1024 * 1024, 7, dtype=np.uint8)
    with tensorcache.connect(
        router, stripe_size="1GiB", chunk_size=4096, transport="grpc"
    ) as c:
        print("putting", flush=True)
        c.put(key, value)
        print("done", flush=True)
    """
)

# A writer that declares 256 MiB, sends 8 MiB, says so, and stalls until killed.
STALLED_WRITER = textwrap.dedent(
    """
    import sys, time
    import grpc
    from tensorcache.grpcutil import CHANNEL_OPTIONS
    from tensorcache.proto import tensorcache_pb2 as pb
    address, key = sys.argv[1], sys.argv[2].encode()
    n = 256 * 1024 * 1024
    meta = pb.TensorMeta(dtype="|u1", shape=[n], order="C", nbytes=n, crc32c=1)
    header = pb.PutRequest(entries=[pb.EntryPut(key=key, meta=meta)]).SerializeToString()

    def stream():
        yield header
        for _ in range(8):
            yield bytes(1024 * 1024)
        print("sent", flush=True)
        time.sleep(120)  # the test kills us long before

    channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    put = channel.stream_unary(
        "/tensorcache.v1.Node/Put", request_serializer=None, response_deserializer=None
    )
    put(stream(), timeout=300)
    """
)


# The same over the TCP data channel (see proto/tensorcache.proto for the framing).
STALLED_DATA_WRITER = textwrap.dedent(
    """
    import socket, struct, sys, time
    from tensorcache.proto import tensorcache_pb2 as pb
    address, key = sys.argv[1], sys.argv[2].encode()
    n = 256 * 1024 * 1024
    meta = pb.TensorMeta(dtype="|u1", shape=[n], order="C", nbytes=n, crc32c=1)
    header = pb.PutRequest(entries=[pb.EntryPut(key=key, meta=meta)]).SerializeToString()
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=60)
    sock.sendall(b"TCD1" + struct.pack("<BI", 1, len(header)) + header)
    for _ in range(8):
        sock.sendall(bytes(1024 * 1024))
    print("sent", flush=True)
    time.sleep(120)  # the test kills us long before
    """
)


@pytest.fixture(scope="module")
def one_node(tmp_path_factory) -> Iterator[LocalCluster]:
    """One node, so the node a raw writer talks to is the key's owner."""
    c = LocalCluster(1, capacity="1GiB", log_dir=tmp_path_factory.mktemp("one")).start()
    yield c
    c.stop()


@pytest.fixture
def c(one_node) -> Iterator[tensorcache.Client]:
    with tensorcache.connect(one_node.router_address) as client:
        yield client


@pytest.fixture
def others(c, prefix) -> dict[str, np.ndarray]:
    vals = {f"{prefix}other-{i}": np.arange(i, i + 1000, dtype=np.int64) for i in range(10)}
    c.put_many(vals)
    return vals


def spawn(code: str, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )


def reserving(c) -> bool:
    return any(s.bytes_reserved > 0 for s in c.stats())


def kill(proc: subprocess.Popen[bytes]) -> tuple[bytes, bytes]:
    proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, (out, err)
    return out, err


def assert_left_nothing(c, key: str, others: dict[str, np.ndarray], puts_before: int) -> None:
    stats = settled(c)  # the reservation is released once the node sees the stream die
    assert c.get(key) is None
    assert sum(s.puts for s in stats) == puts_before  # nothing committed
    got = c.get_many(list(others))
    for k, v in others.items():
        assert_same(got[k], v)
    fresh = np.linspace(0, 1, 5000)
    c.put(key + "/after", fresh)
    assert_same(c.get(key + "/after"), fresh)


def test_client_killed_mid_put(c, one_node, prefix, others):
    key = prefix + "K"
    puts_before = sum(s.puts for s in c.stats())
    proc = spawn(PUBLIC_WRITER, one_node.router_address, key)
    try:
        poll(lambda: reserving(c) or proc.poll() is not None, timeout=60, what="the put to start")
        assert proc.poll() is None, proc.communicate()
        assert reserving(c)
    finally:
        out, _ = kill(proc)
    assert b"done" not in out
    assert_left_nothing(c, key, others, puts_before)


@pytest.mark.parametrize("channel", ["grpc", "data"])
def test_stalled_writer_killed_mid_stream(c, one_node, prefix, others, channel):
    key = prefix + "K"
    (member,) = one_node.ring().members
    puts_before = sum(s.puts for s in c.stats())
    if channel == "grpc":
        proc = spawn(STALLED_WRITER, member.address, key)
    else:
        assert member.data_address, "the node advertises no data channel"
        proc = spawn(STALLED_DATA_WRITER, member.data_address, key)
    try:
        assert read_line(proc) == "sent\n"
        poll(lambda: reserving(c), what="the node to reserve the declared bytes")
        assert sum(s.bytes_reserved for s in c.stats()) >= 256 * MIB
    finally:
        kill(proc)
    assert_left_nothing(c, key, others, puts_before)


def test_writer_that_cancels_mid_stream(c, one_node, prefix, others):
    key = prefix + "K"
    node = next(iter(one_node.nodes.values()))
    puts_before = sum(s.puts for s in c.stats())
    n = 64 * MIB
    header = tensor_header(key.encode(), b"", shape=[n], nbytes=n, crc=1)

    class WriterGaveUp(Exception):
        pass

    def stream() -> Iterator[bytes]:
        yield header
        for _ in range(4):
            yield bytes(MIB)
        raise WriterGaveUp  # gRPC cancels the call on the writer's side

    with pytest.raises(grpc.RpcError) as info:
        raw_put(node.address, stream())
    assert info.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN)
    assert_left_nothing(c, key, others, puts_before)
