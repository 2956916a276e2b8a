"""Node-to-node calls: warm handoffs, drains and fences.

``Peers`` is the seam: three calls a node makes on another node. The gRPC
implementation keeps one channel per address (a small cache: a node talks to
the few members of its rings) and maps every gRPC failure to ``Unavailable``
in one place; callers treat any failure as "that peer has nothing for us".
Tests plug in an in-process implementation.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from typing import Protocol

import grpc

from tensorcache.authgrpc import NO_CREDENTIALS, Credentials
from tensorcache.errors import InvalidArgument, from_rpc_error
from tensorcache.grpcutil import NodeStub
from tensorcache.proto import tensorcache_pb2 as pb

MAX_CHANNELS = 256  # beyond this the cache starts over (members change rarely)


class Peers(Protocol):
    def get(
        self, address: str, request: pb.GetRequest, timeout: float
    ) -> tuple[pb.GetReply, list[bytes]]:
        """The reply header and the payload messages (raises TensorCacheError)."""
        ...

    def put(
        self, address: str, request: pb.PutRequest, payload: Iterable[bytes], timeout: float
    ) -> pb.PutReply: ...

    def fence(self, address: str, epoch: int, timeout: float) -> int: ...


class GrpcPeers:
    """``Peers`` over each node's gRPC server."""

    def __init__(self, creds: Credentials = NO_CREDENTIALS) -> None:
        self._creds = creds
        self._conns: dict[str, NodeStub] = {}
        self._lock = threading.Lock()

    def _conn(self, address: str) -> NodeStub:
        conn = self._conns.get(address)
        if conn is None:
            with self._lock:
                conn = self._conns.get(address)
                if conn is None:
                    if len(self._conns) >= MAX_CHANNELS:
                        self._close_locked()
                    conn = self._conns[address] = NodeStub(address, self._creds)
        return conn

    def get(
        self, address: str, request: pb.GetRequest, timeout: float
    ) -> tuple[pb.GetReply, list[bytes]]:
        try:
            messages = list(self._conn(address).get(request, timeout=timeout))
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, f"node {address}") from exc
        if not messages:
            raise InvalidArgument(f"node {address}: a Get stream without a header")
        return pb.GetReply.FromString(messages[0]), messages[1:]

    def put(
        self, address: str, request: pb.PutRequest, payload: Iterable[bytes], timeout: float
    ) -> pb.PutReply:
        def stream() -> Iterator[bytes]:
            yield request.SerializeToString()
            yield from payload

        try:
            reply: pb.PutReply = self._conn(address).put(stream(), timeout=timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, f"node {address}") from exc
        return reply

    def fence(self, address: str, epoch: int, timeout: float) -> int:
        try:
            reply = self._conn(address).fence(pb.FenceRequest(epoch=epoch), timeout=timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, f"node {address}") from exc
        return int(reply.epoch)

    def _close_locked(self) -> None:
        for conn in self._conns.values():
            conn.channel.close()
        self._conns.clear()

    def close(self) -> None:
        with self._lock:
            self._close_locked()
