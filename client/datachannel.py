"""Client side of the TCP data channel (see proto/tensorcache.proto).

A few persistent connections per node, handed to one request at a time.
A GET receives each entry's payload with ``recv_into`` straight into its
destination array; a PUT sends the caller's arrays with ``sendmsg`` without
copying them. Any socket error closes that connection and surfaces as
``Unavailable`` so the caller's retry policy applies.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import numpy as np
from google.protobuf.message import DecodeError, Message

from tensorcache.client.tickets import TicketSource, connect_ticketed
from tensorcache.dataproto import (
    MAGIC,
    OP_AUTH,
    OP_GET,
    OP_PUT,
    OP_RELEASE,
    STATUS_BY_NUMBER,
    PeerClosed,
    Reader,
    frame,
    kernel_timeouts,
    send_buffers,
)
from tensorcache.errors import ProtocolError, Unavailable, from_status
from tensorcache.proto import tensorcache_pb2 as pb
from tensorcache.tickets import OP_TICKET

M = TypeVar("M", bound=Message)
SMALL_PUT = 64 * 1024  # payload up to this is joined with its header and sent at once


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _parse(cls: type[M], raw: bytes, address: str) -> M:
    """A reply header; one that does not parse is the node breaking the contract."""
    try:
        return cls.FromString(raw)
    except DecodeError:
        raise ProtocolError(
            f"node {address}: a malformed {cls.__name__} header ({len(raw)} bytes)"
        ) from None


class DataConn:
    def __init__(
        self,
        address: str,
        timeout_s: float,
        token: str | None = None,
        tls: ssl.SSLContext | None = None,
        ticket: TicketSource | None = None,
    ) -> None:
        """``ticket``: the node's data channel is plaintext and opens with a
        ticket (client/tickets.py); then neither ``tls`` nor ``token`` is used."""
        self.address = address
        first = b""
        if ticket is not None:
            self.sock, granted = connect_ticketed(_split(address), timeout_s, ticket)
            first, token, tls = frame(OP_TICKET, granted), None, None
        else:
            try:
                self.sock = socket.create_connection(_split(address), timeout=timeout_s)
            except OSError as exc:
                raise Unavailable(f"data channel {address}: {exc}") from exc
        try:  # a node that resets us right after accepting is unreachable too
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            kernel_timeouts(self.sock, timeout_s, send=True)
            if tls is not None:  # mutual TLS: the node checks our certificate too
                self.sock = tls.wrap_socket(self.sock, server_hostname=_split(address)[0])
            # A token goes first, unanswered: no round trip; a refusal is
            # the reply the first request reads.
            self.sock.sendall(MAGIC + first + (frame(OP_AUTH, token.encode()) if token else b""))
        except OSError as exc:
            self.close()
            raise Unavailable(f"data channel {address}: {exc}") from exc
        self.reader = Reader(self.sock)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def alive(self) -> bool:
        """An idle connection is alive if the node has sent nothing (no EOF)."""
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
        except (OSError, ValueError):
            return False
        return not readable

    def _reply(self) -> bytes:
        got = self.reader.read_frame()
        if got is None:
            raise PeerClosed("node closed the data connection")
        status, header = got
        if status == 0:
            return header
        try:
            err = pb.DataError.FromString(header)
        except DecodeError:
            # The stream can no longer be trusted: a typed error, and the
            # pool closes the connection (TensorCacheError).
            raise ProtocolError(
                f"node {self.address}: a malformed error frame (status {status}, "
                f"{len(header)} header bytes)"
            ) from None
        raise from_status(
            STATUS_BY_NUMBER.get(status), f"node {self.address}: {err.message}", err.epoch
        )

    def put(self, header: pb.PutRequest, views: Sequence[np.ndarray]) -> pb.PutReply:
        head = header.SerializeToString()
        buffers: list[bytes | np.ndarray] = [frame(OP_PUT, head), *views]
        try:
            if sum(v.nbytes for v in views) <= SMALL_PUT:
                # One joined copy and sendall: less than a scatter list of
                # casted views for a 4 KiB put (#18).
                self.sock.sendall(b"".join(buffers))
            else:
                send_buffers(self.sock, buffers)
        except OSError:
            # The node may have refused the put and closed the connection
            # before reading the payload: its reason waits in our receive
            # buffer, and is the error worth raising.
            with contextlib.suppress(OSError, PeerClosed, ProtocolError):
                self._reply()
            raise
        return _parse(pb.PutReply, self._reply(), self.address)

    def control(self, op: int, header: bytes) -> bytes:
        """A control-size request (GET head_only, DELETE, FILL): its reply header."""
        self.sock.sendall(frame(op, header))
        return self._reply()

    def release(self) -> None:
        """Tell the node we are done with the buffers of our last local GET."""
        self.sock.sendall(frame(OP_RELEASE, b""))

    def get(
        self,
        request: pb.GetRequest,
        destinations: Callable[[pb.GetReply], list[np.ndarray]],
    ) -> tuple[pb.GetReply, list[int]]:
        """Send a GET; ``destinations(reply)`` names where each payload goes."""
        self.sock.sendall(frame(OP_GET, request.SerializeToString()))
        reply = _parse(pb.GetReply, self._reply(), self.address)
        crcs: list[int] = []
        if not request.head_only:
            for dest in destinations(reply):
                crcs.append(self.reader.read_into(memoryview(dest).cast("B")) if dest.nbytes else 0)
        return reply, crcs


class DataPool:
    """Idle data connections per node address (thread-safe)."""

    def __init__(
        self,
        timeout_s: float,
        max_idle_per_node: int = 8,
        token: str | None = None,
        tls: Callable[[], ssl.SSLContext | None] = lambda: None,
        tickets: Callable[[str], TicketSource | None] = lambda address: None,
    ) -> None:
        """``tls``: the client TLS context for a new connection (None: plaintext).
        ``tickets``: for a data address, how to get a ticket (None: that node's
        data channel takes none; it is TLS or plaintext as ``tls`` says)."""
        self._timeout_s = timeout_s
        self._token = token
        self._tls = tls
        self._tickets = tickets
        self._max_idle = max_idle_per_node
        self._idle: dict[str, list[DataConn]] = {}
        self._lock = threading.Lock()
        self._closed = False

    def _take(self, address: str) -> DataConn:
        """An idle connection to ``address`` still open at the node's end, or a new one."""
        while True:
            with self._lock:
                idle = self._idle.get(address)
                conn = idle.pop() if idle else None
            if conn is None:
                source = self._tickets(address)
                tls = None if source is not None else self._tls()
                return DataConn(address, self._timeout_s, self._token, tls, source)
            if conn.alive():
                return conn
            conn.close()  # closed by the node while idle (idle timeout, restart)

    def _give(self, address: str, conn: DataConn) -> None:
        """Back to the idle list after a request that left the stream in step."""
        with self._lock:
            idle = self._idle.setdefault(address, [])
            if not self._closed and len(idle) < self._max_idle:
                idle.append(conn)
                return
        conn.close()

    @contextlib.contextmanager
    def connection(self, address: str) -> Iterator[DataConn]:
        conn = self._take(address)
        try:
            yield conn
        except (OSError, PeerClosed) as exc:
            conn.close()
            raise Unavailable(f"data channel {address}: {exc}") from exc
        except BaseException:
            # Any other failure, a TensorCacheError included: after some error
            # frames (a GET error) the stream is still in step and could be
            # reused, but closing is simpler and always safe.
            conn.close()
            raise
        self._give(address, conn)

    def control(self, address: str, op: int, header: bytes) -> bytes:
        """One control-size request (``DataConn.control``) on a pooled connection.

        ``connection()`` without its generator: a version check is mostly
        per-call overhead, and this is on its path (#18).
        """
        conn = self._take(address)
        try:
            raw = conn.control(op, header)
        except (OSError, PeerClosed) as exc:
            conn.close()
            raise Unavailable(f"data channel {address}: {exc}") from exc
        except BaseException:
            conn.close()
            raise
        self._give(address, conn)
        return raw

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for conns in self._idle.values():
                for c in conns:
                    c.close()
            self._idle.clear()
