"""The soak's fault proxy on its own: an echo server behind it, each fault observed.

Real sockets on loopback (integration), no tensorcache processes; a few
seconds in all. Every wait is bounded by a socket timeout.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from .proxy import FaultProxy, Faults

pytestmark = pytest.mark.integration

TIMEOUT_S = 5.0


class Echo:
    """A threaded echo server on 127.0.0.1 (port 0)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                conn.sendall(data)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def echo() -> Iterator[Echo]:
    e = Echo()
    yield e
    e.close()


@pytest.fixture
def proxy() -> Iterator[FaultProxy]:
    with FaultProxy() as p:
        yield p


def _connect(port: int, host: str = "127.0.0.1") -> socket.socket:
    s = socket.create_connection((host, port), timeout=TIMEOUT_S)
    s.settimeout(TIMEOUT_S)
    return s


def _roundtrip(s: socket.socket, payload: bytes) -> bytes:
    s.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = s.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def test_forwards_bytes_intact_on_another_loopback_address(echo: Echo, proxy: FaultProxy):
    port = proxy.add_route("n", ("127.0.0.2", 0), [("127.0.0.1", echo.port)])
    payload = bytes(range(256)) * 4096  # 1 MiB
    with _connect(port, "127.0.0.2") as s:
        assert _roundtrip(s, payload) == payload
    assert proxy.stats()["n"]["bytes"] >= 2 * len(payload)


def test_latency_delays_each_direction(echo: Echo, proxy: FaultProxy):
    port = proxy.add_route("n", ("127.0.0.1", 0), [("127.0.0.1", echo.port)])
    proxy.set_faults("n", Faults(latency_s=0.2))
    with _connect(port) as s:
        t = time.monotonic()
        assert _roundtrip(s, b"ping") == b"ping"
        assert time.monotonic() - t >= 0.4  # 0.2 s each way
        proxy.heal("n")
        t = time.monotonic()
        assert _roundtrip(s, b"ping") == b"ping"
        assert time.monotonic() - t < 0.2


def test_bandwidth_cap_paces_a_transfer(echo: Echo, proxy: FaultProxy):
    port = proxy.add_route("n", ("127.0.0.1", 0), [("127.0.0.1", echo.port)])
    proxy.set_faults("n", Faults(bandwidth_bps=1_000_000))
    payload = b"x" * 500_000
    with _connect(port) as s:
        t = time.monotonic()
        assert _roundtrip(s, payload) == payload
        assert time.monotonic() - t >= 0.4  # 0.5 MB at 1 MB/s, less the last chunk's pause


def test_blackhole_holds_bytes_and_delivers_them_intact_when_healed(echo: Echo, proxy: FaultProxy):
    port = proxy.add_route("n", ("127.0.0.1", 0), [("127.0.0.1", echo.port)])
    with _connect(port) as s:
        assert _roundtrip(s, b"a") == b"a"
        proxy.set_faults("n", Faults(blackhole=True))
        s.sendall(b"held")
        s.settimeout(0.3)
        with pytest.raises(TimeoutError):
            s.recv(16)
        # A new connection is accepted but not forwarded while the hole holds.
        accepted = echo.accepted
        with _connect(port) as s2:
            s2.settimeout(0.3)
            s2.sendall(b"new")
            with pytest.raises(TimeoutError):
                s2.recv(16)
            assert echo.accepted == accepted
            proxy.heal("n")
            s2.settimeout(TIMEOUT_S)
            assert s2.recv(16) == b"new"
        s.settimeout(TIMEOUT_S)
        assert s.recv(16) == b"held"


def test_reset_aborts_open_connections_with_rst(echo: Echo, proxy: FaultProxy):
    port = proxy.add_route("n", ("127.0.0.1", 0), [("127.0.0.1", echo.port)])
    with _connect(port) as s:
        assert _roundtrip(s, b"a") == b"a"
        assert proxy.reset("n") == 1
        with pytest.raises(ConnectionResetError):
            for _ in range(100):  # bounded: the RST arrives at once on loopback
                s.sendall(b"b")
                if not s.recv(16):
                    break
                time.sleep(0.01)
    # The route still serves new connections.
    with _connect(port) as s:
        assert _roundtrip(s, b"c") == b"c"
    assert proxy.stats()["n"]["resets"] == 1


def test_several_upstreams_skip_a_dead_one(echo: Echo, proxy: FaultProxy):
    dead = socket.create_server(("127.0.0.1", 0))
    dead_port = dead.getsockname()[1]
    dead.close()
    port = proxy.add_route(
        "routers", ("127.0.0.1", 0), [("127.0.0.1", dead_port), ("127.0.0.1", echo.port)]
    )
    for _ in range(3):  # whichever upstream a connection starts at, it reaches the live one
        with _connect(port) as s:
            assert _roundtrip(s, b"x") == b"x"


def test_invalid_faults_are_refused():
    with pytest.raises(ValueError):
        Faults(latency_s=-1)
    with pytest.raises(ValueError):
        Faults(bandwidth_bps=-5)
