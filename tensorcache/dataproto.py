"""Framing of the TCP data channel, shared by nodes and clients.

See the "data channel" section of proto/tensorcache.proto for the contract.
Payload moves with ``recv_into`` straight into its destination (the client's
result array, or the node's stored buffer) and with ``sendmsg`` straight from
where it lives (the client's array, or the node's stored chunks): one kernel
copy each way, nothing in user space.
"""

from __future__ import annotations

import socket
import ssl
import struct
from collections.abc import Sequence

import grpc

from tensorcache import codec
from tensorcache.errors import ProtocolError

MAGIC = b"TCD1"
OP_PUT = 1
OP_GET = 2
OP_RELEASE = 3
OP_AUTH = 4  # header: the client's token; no reply (an error frame and close if refused)
# Control-size requests (header in, header out, no payload): the same
# messages as the gRPC methods of that name, without gRPC's per-call cost.
OP_DELETE = 5  # header DeleteRequest; reply DeleteReply
OP_FILL = 6  # header FillRequest; reply FillReply
FRAME = struct.Struct("<BI")  # op or status, header length
MAX_HEADER = 64 * 1024 * 1024
# Before a connection has authenticated (a node with --auth-tokens), its first
# frame may be only this large: an unknown peer cannot make the node hold
# 64 MiB per connection.
MAX_AUTH_HEADER = 4096
# Receive in pieces of this size so each piece is checksummed while it is
# still in the CPU cache.
RECV_PIECE = 1024 * 1024
_IOV_MAX = 512
TLS_JOIN = 64 * 1024

STATUS_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


class PeerClosed(ConnectionError):
    """The other end closed the connection."""


class Reader:
    """Buffered reads from a socket: a whole small frame in one ``recv``.

    Headers are read through a 64 KiB buffer (one syscall for a request or a
    small reply instead of three); bulk payload goes straight into its
    destination with ``recv_into`` once the buffered bytes are used up.
    """

    __slots__ = ("_buf", "_end", "_pos", "_view", "sock")

    def __init__(self, sock: socket.socket, size: int = 64 * 1024) -> None:
        self.sock = sock
        self._buf = bytearray(size)
        self._view = memoryview(self._buf)
        self._pos = 0
        self._end = 0

    def _fill(self) -> int:
        if self._pos == self._end:
            self._pos = self._end = 0
        got = self.sock.recv_into(self._view[self._end :])
        self._end += got
        return got

    def _buffer(self, n: int) -> None:
        """Make at least ``n`` (<= buffer size) bytes available in the buffer."""
        if self._pos == self._end:
            self._pos = self._end = 0
        elif len(self._buf) - self._pos < n:  # compact to make room
            left = self._end - self._pos
            self._view[:left] = self._view[self._pos : self._end]
            self._pos, self._end = 0, left
        while self._end - self._pos < n:
            if self._fill() == 0:
                raise PeerClosed(f"connection closed after {self._end - self._pos} of {n} bytes")

    def read_exact(self, n: int) -> bytes:
        """Exactly ``n`` bytes (headers)."""
        if n > len(self._buf):
            big = bytearray(n)
            self.read_into(memoryview(big), checksum=False)
            return bytes(big)
        self._buffer(n)
        out = bytes(self._view[self._pos : self._pos + n])
        self._pos += n
        return out

    def read_into(self, view: memoryview, *, checksum: bool = True) -> int:
        """Fill ``view``; return the CRC32C of what arrived (0 if not asked).

        Small reads go through the buffer (one ``recv`` serves many of them:
        a batch of 4 KiB tensors); large ones land in ``view`` directly.
        """
        n = len(view)
        if self._end - self._pos < n <= len(self._buf) // 4:
            self._buffer(n)
        crc = 0
        take = min(n, self._end - self._pos)
        if take:
            view[:take] = self._view[self._pos : self._pos + take]
            self._pos += take
            if checksum:
                crc = codec.crc32c(view[:take])
        off = take
        while off < n:
            got = self.sock.recv_into(view[off:], min(n - off, RECV_PIECE))
            if got == 0:
                raise PeerClosed(f"connection closed after {off} of {n} bytes")
            if checksum:
                crc = codec.crc32c(view[off : off + got], crc)
            off += got
        return crc

    def discard(self, n: int) -> None:
        """Read and drop ``n`` bytes."""
        scratch = memoryview(bytearray(min(n, RECV_PIECE)))
        while n > 0:
            take = min(n, len(scratch))
            self.read_into(scratch[:take], checksum=False)
            n -= take

    def read_frame(self, limit: int = MAX_HEADER) -> tuple[int, bytes] | None:
        """One frame (code, header); None on a clean close before its first byte.

        ``limit``: the largest header accepted (a node allows an unauthenticated
        peer only a small one: MAX_AUTH_HEADER)."""
        if self._pos == self._end and self._fill() == 0:
            return None
        code, length = FRAME.unpack(self.read_exact(FRAME.size))
        if length > limit:
            raise ProtocolError(f"frame header of {length} bytes exceeds the {limit}-byte limit")
        return code, self.read_exact(length)


def kernel_timeouts(sock: socket.socket, seconds: float, *, send: bool) -> None:
    """Receive (and optionally send) timeouts enforced by the kernel.

    A Python socket timeout would poll() before every call (measured +36 us
    per small get); SO_RCVTIMEO/SO_SNDTIMEO on a blocking socket cost nothing.
    """
    sock.settimeout(None)
    tv = struct.pack("ll", int(seconds), int((seconds % 1) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    if send:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


def send_buffers(sock: socket.socket, buffers: Sequence[object]) -> None:
    """Send every buffer in order with scatter-gather I/O, no joining copies."""
    queue = [memoryview(b).cast("B") for b in buffers]  # type: ignore[arg-type]  # bytes-likes
    queue = [q for q in queue if len(q)]
    if isinstance(sock, ssl.SSLSocket):  # TLS has no sendmsg: small pieces joined
        _send_tls(sock, queue)
        return
    i = 0
    while i < len(queue):
        sent = sock.sendmsg(queue[i : i + _IOV_MAX])
        while sent > 0:
            n = len(queue[i])
            if sent >= n:
                sent -= n
                i += 1
            else:
                queue[i] = queue[i][sent:]
                sent = 0


def _send_tls(sock: ssl.SSLSocket, queue: list[memoryview]) -> None:
    """Send over TLS: runs of small buffers joined (one record), large ones as they are."""
    run: list[memoryview] = []
    size = 0
    for q in queue:
        if len(q) < TLS_JOIN:
            run.append(q)
            size += len(q)
            if size < TLS_JOIN:
                continue
        if run:
            sock.sendall(b"".join(run))
            run, size = [], 0
        if len(q) >= TLS_JOIN:
            sock.sendall(q)
    if run:
        sock.sendall(b"".join(run))


def frame(code: int, header: bytes) -> bytes:
    return FRAME.pack(code, len(header)) + header
