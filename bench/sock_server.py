"""The raw-socket baseline server: the loopback limit for one TCP stream.

``python -m bench.sock_server --port 0`` prints ``listening on PORT`` and
serves until SIGTERM. It holds one RAM-resident buffer, allocated and
touched (every page faulted in) before any timed request, so the numbers
measure the socket path alone:

- ``G n``: ``sendall`` the buffer's first n bytes (a get);
- ``P n`` + n bytes: ``recv_into`` the buffer, answer ``k`` (a put);
- ``A n``: make the buffer at least n bytes and touch it, answer ``k``;
- ``F 0``: drop the buffer, answer ``k``.

A request is 9 bytes: one op byte and a big-endian u64. After a put the
buffer holds what was put, so a following get returns the same bytes.
"""

from __future__ import annotations

import argparse
import signal
import socket
import struct
import sys
import threading

import numpy as np

HEADER = struct.Struct("!cQ")
ACK = b"k"


def recv_exact_into(sock: socket.socket, view: memoryview) -> bool:
    """Fill ``view``; False if the peer closed first."""
    got, n = 0, len(view)
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            return False
        got += k
    return True


class Baseline:
    def __init__(self) -> None:
        self.buf = np.empty(0, np.uint8)
        self.lock = threading.Lock()  # one buffer; connections take turns

    def ensure(self, nbytes: int) -> memoryview:
        if self.buf.nbytes < nbytes:
            self.buf = np.empty(0, np.uint8)  # free the old one first
            buf = np.empty(nbytes, np.uint8)
            buf.fill(1)
            self.buf = buf
        return memoryview(self.buf)[:nbytes]

    def serve(self, conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        head = bytearray(HEADER.size)
        hview = memoryview(head)
        with conn:
            while recv_exact_into(conn, hview):
                op, n = HEADER.unpack(head)
                with self.lock:
                    if op == b"G":
                        conn.sendall(self.ensure(n))
                    elif op == b"P":
                        if not recv_exact_into(conn, self.ensure(n)):
                            return
                        conn.sendall(ACK)
                    elif op == b"A":
                        self.ensure(n)
                        conn.sendall(ACK)
                    elif op == b"F":
                        self.buf = np.empty(0, np.uint8)
                        conn.sendall(ACK)
                    else:
                        print(f"bad op {op!r}; closing", file=sys.stderr)
                        return


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sock_server")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server = Baseline()
    with socket.create_server((args.host, args.port)) as lsock:
        print(f"listening on {lsock.getsockname()[1]}", flush=True)
        while True:
            conn, _ = lsock.accept()
            threading.Thread(target=server.serve, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
