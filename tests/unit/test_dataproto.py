"""The data channel's framing helpers, over a real socketpair."""

from __future__ import annotations

import socket
import threading

import numpy as np
import pytest

from tensorcache import codec
from tensorcache.dataproto import FRAME, MAX_HEADER, PeerClosed, Reader, frame, send_buffers
from tensorcache.errors import ProtocolError

pytestmark = pytest.mark.unit


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def _send_later(sock: socket.socket, data: bytes) -> threading.Thread:
    t = threading.Thread(target=sock.sendall, args=(data,))
    t.start()
    return t


def test_frames_and_payload_split_across_buffer_and_socket(pair):
    a, b = pair
    payload = np.random.default_rng(1).integers(0, 255, 300_000, dtype=np.uint8)
    t = _send_later(a, frame(2, b"hello") + frame(0, b"") + payload.tobytes())
    r = Reader(b, size=1024)  # smaller than the payload: part buffered, part direct
    assert r.read_frame() == (2, b"hello")
    assert r.read_frame() == (0, b"")
    dest = np.empty_like(payload)
    crc = r.read_into(memoryview(dest))
    t.join()
    assert np.array_equal(dest, payload)
    assert crc == codec.crc32c(payload)


def test_read_exact_larger_than_buffer(pair):
    a, b = pair
    data = bytes(range(256)) * 40
    t = _send_later(a, data)
    assert Reader(b, size=64).read_exact(len(data)) == data
    t.join()


def test_clean_close_between_frames_is_none_and_mid_frame_is_an_error(pair):
    a, b = pair
    a.sendall(frame(1, b"x"))
    a.sendall(FRAME.pack(1, 10) + b"abc")
    a.close()
    r = Reader(b)
    assert r.read_frame() == (1, b"x")
    with pytest.raises(PeerClosed):
        r.read_frame()


def test_oversized_header_is_refused(pair):
    a, b = pair
    a.sendall(FRAME.pack(1, MAX_HEADER + 1))
    with pytest.raises(ProtocolError, match="exceeds"):
        Reader(b).read_frame()


def test_send_buffers_keeps_order_over_many_buffers(pair):
    a, b = pair
    bufs = [bytes([i % 251]) * (i % 7 + 1) for i in range(3000)]  # > IOV_MAX buffers
    bufs.append(np.arange(200_000, dtype=np.uint8) % 13)
    want = b"".join(bytes(x) for x in bufs)
    got = bytearray()

    def drain() -> None:
        while len(got) < len(want):
            got.extend(b.recv(1 << 20))

    t = threading.Thread(target=drain)
    t.start()
    send_buffers(a, bufs)
    t.join(timeout=30)
    assert bytes(got) == want
