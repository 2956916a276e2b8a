"""Connections to nodes and the router, and the payload stream codecs.

``NodeConn`` wraps one gRPC channel per node address with the four Node
methods; Put and Get use identity (de)serializers for their payload side
(see proto/tensorcache.proto). ``payload_messages`` and ``read_payload``
are the two halves of the payload stream: the sender slices tensors' byte
views into messages of at most ``chunk_size`` bytes, the receiver copies
every message straight into the preallocated destination arrays, checksumming
as it goes, with no concatenation.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from typing import Protocol

import grpc
import numpy as np

from tensorcache import codec
from tensorcache.authgrpc import NO_CREDENTIALS, Credentials
from tensorcache.errors import ProtocolError, Unavailable, from_rpc_error
from tensorcache.grpcutil import CHANNEL_OPTIONS, NodeStub
from tensorcache.proto import tensorcache_pb2 as pb
from tensorcache.proto import tensorcache_pb2_grpc as pb_grpc

# One node's methods (shared with peer nodes: tensorcache/grpcutil.py).
NodeConn = NodeStub


class ConnPool:
    """Node connections by address, created on first use, shared by threads."""

    def __init__(self, creds: Credentials = NO_CREDENTIALS) -> None:
        self._creds = creds
        self._conns: dict[str, NodeConn] = {}
        self._lock = threading.Lock()

    def get(self, address: str) -> NodeConn:
        conn = self._conns.get(address)
        if conn is None:
            with self._lock:
                conn = self._conns.get(address)
                if conn is None:
                    conn = self._conns[address] = NodeConn(address, self._creds)
        return conn

    def close(self) -> None:
        with self._lock:
            for conn in self._conns.values():
                conn.close()
            self._conns.clear()


class RouterTransport(Protocol):
    """What the client asks of the control plane (the in-memory fake has its own)."""

    address: str

    def get_ring(self, timeout_s: float) -> pb.RingSnapshot: ...

    def invalidate(self, prefix: str, timeout_s: float) -> int: ...

    def close(self) -> None: ...


class RouterConn:
    """A router over gRPC."""

    def __init__(self, address: str, creds: Credentials = NO_CREDENTIALS) -> None:
        self.address = address
        self.channel = creds.channel(address, CHANNEL_OPTIONS)
        self.stub = pb_grpc.RouterStub(self.channel)

    def get_ring(self, timeout_s: float) -> pb.RingSnapshot:
        try:
            snap: pb.RingSnapshot = self.stub.GetRing(
                pb.GetRingRequest(), timeout=timeout_s, wait_for_ready=True
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, f"router {self.address}") from exc
        return snap

    def invalidate(self, prefix: str, timeout_s: float) -> int:
        """Record an invalidation of ``prefix``; returns its generation (an epoch)."""
        try:
            reply: pb.InvalidateReply = self.stub.Invalidate(
                pb.InvalidateRequest(prefix=prefix), timeout=timeout_s
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, f"invalidate {prefix!r} at router {self.address}") from exc
        return reply.generation

    def close(self) -> None:
        self.channel.close()


def payload_messages(views: Iterable[np.ndarray], chunk_size: int) -> Iterator[bytes]:
    """Yield the concatenation of ``views`` (flat uint8) as messages <= chunk_size.

    Large views are sliced (one copy into a ``bytes``, which grpc requires);
    small ones are packed together so a batch of 4 KiB tensors travels in
    a few large messages instead of thousands of tiny ones.
    """
    buf = bytearray()
    for view in views:
        n = view.nbytes
        if n == 0:
            continue
        if n >= chunk_size // 2:
            if buf:
                yield bytes(buf)
                buf.clear()
            for off in range(0, n, chunk_size):
                yield view[off : off + chunk_size].tobytes()
            continue
        buf += view.data
        if len(buf) >= chunk_size:
            yield bytes(buf)
            buf.clear()
    if buf:
        yield bytes(buf)


def read_payload(messages: Iterator[bytes], dests: list[np.ndarray], where: str) -> list[int]:
    """Copy a payload stream into ``dests`` (flat uint8 arrays), in order.

    Returns the CRC32C of what each destination received. A stream longer or
    shorter than the destinations is a protocol error / broken stream.
    """
    crcs = [0] * len(dests)
    idx = 0
    need = dests[0].nbytes if dests else 0
    off = 0
    for msg in messages:
        pos, n = 0, len(msg)
        while pos < n:
            while need == 0:
                idx += 1
                if idx >= len(dests):
                    raise ProtocolError(f"{where}: more payload bytes than the header declares")
                need, off = dests[idx].nbytes, 0
            take = min(need, n - pos)
            dests[idx][off : off + take] = np.frombuffer(
                msg, dtype=np.uint8, count=take, offset=pos
            )
            crcs[idx] = codec.crc32c(memoryview(msg)[pos : pos + take], crcs[idx])
            pos += take
            off += take
            need -= take
    if need or any(d.nbytes for d in dests[idx + 1 :]):
        raise Unavailable(f"{where}: payload stream ended early (node stopped mid-transfer?)")
    return crcs
