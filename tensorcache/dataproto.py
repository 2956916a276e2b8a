"""Framing of the TCP data channel, shared by nodes and clients.

See the "data channel" section of proto/tensorcache.proto for the contract.
Payload moves with ``recv_into`` straight into its destination (the client's
result array, or the node's stored buffer) and with ``sendmsg`` straight from
where it lives (the client's array, or the node's stored chunks): one kernel
copy each way, nothing in user space.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Sequence

import grpc

from tensorcache import codec
from tensorcache.errors import ProtocolError

MAGIC = b"TCD1"
OP_PUT = 1
OP_GET = 2
FRAME = struct.Struct("<BI")  # op or status, header length
MAX_HEADER = 64 * 1024 * 1024
# Receive in pieces of this size so each piece is checksummed while it is
# still in the CPU cache.
RECV_PIECE = 1024 * 1024
_IOV_MAX = 512

STATUS_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


class PeerClosed(ConnectionError):
    """The other end closed the connection."""


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Read exactly ``n`` bytes (small reads: headers)."""
    buf = bytearray(n)
    recv_into_exact(sock, memoryview(buf), checksum=False)
    return bytes(buf)


def recv_into_exact(sock: socket.socket, view: memoryview, *, checksum: bool = True) -> int:
    """Fill ``view`` from ``sock``; return the CRC32C of what arrived (0 if not asked)."""
    crc = 0
    off, n = 0, len(view)
    while off < n:
        got = sock.recv_into(view[off:], min(n - off, RECV_PIECE))
        if got == 0:
            raise PeerClosed(f"connection closed after {off} of {n} bytes")
        if checksum:
            crc = codec.crc32c(view[off : off + got], crc)
        off += got
    return crc


def send_buffers(sock: socket.socket, buffers: Sequence[object]) -> None:
    """Send every buffer in order with scatter-gather I/O, no joining copies."""
    queue = [memoryview(b).cast("B") for b in buffers]  # type: ignore[arg-type]
    queue = [q for q in queue if len(q)]
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


def frame(code: int, header: bytes) -> bytes:
    return FRAME.pack(code, len(header)) + header


def read_frame(sock: socket.socket) -> tuple[int, bytes] | None:
    """Read one frame; None on a clean close before its first byte."""
    first = sock.recv(1)
    if not first:
        return None
    code, length = FRAME.unpack(first + recv_exact(sock, FRAME.size - 1))
    if length > MAX_HEADER:
        raise ProtocolError(f"frame header of {length} bytes exceeds the {MAX_HEADER}-byte limit")
    return code, recv_exact(sock, length)
