"""Start and stop the systems tensorcache is compared with, on 127.0.0.1.

Each helper is a context manager yielding a ``Server`` (pid, host, port).
Readiness is polled (a real request answered), never assumed after a sleep.
On any exit, Ctrl-C included, the child gets SIGTERM, then SIGKILL after a
timeout; children also get PR_SET_PDEATHSIG so they die with the benchmark
even if it is SIGKILLed.

- ``redis_server``: the distribution's ``redis-server`` on a free port, no
  persistence, limits raised so multi-GiB strings fit.
- ``flight_server``: ``python -m bench.flight_server`` (its own process and
  GIL, as our nodes have).
- ``socket_server``: ``python -m bench.sock_server``, the raw-socket baseline.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tensorcache.apps.etcdserver import free_port

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"


class PeerUnavailable(RuntimeError):
    """A peer cannot run here (binary or package missing); the caller skips it."""


@dataclass(frozen=True)
class Server:
    name: str
    pid: int
    host: str
    port: int
    version: str = ""

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def _die_with_parent() -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _stop(popen: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    if popen.poll() is None:
        popen.terminate()
        try:
            popen.wait(timeout)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait()
    if popen.stdout is not None:
        popen.stdout.close()


def _log_tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-2000:]
    except OSError:
        return ""


def _wait_ready(
    name: str,
    popen: subprocess.Popen[bytes],
    ready: Callable[[], bool],
    timeout: float,
    log: Path,
) -> None:
    """Poll ``ready()`` until it is true; fail early if the child exits."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while not ready():
        if popen.poll() is not None:
            raise RuntimeError(f"{name} exited with {popen.returncode}; log:\n{_log_tail(log)}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} not ready after {timeout:.0f}s; log:\n{_log_tail(log)}")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


@contextlib.contextmanager
def _child(
    name: str, argv: list[str], log_dir: Path, *, announce: bool, timeout: float
) -> Iterator[tuple[subprocess.Popen[bytes], int | None, Path]]:
    """Run ``argv``; with ``announce`` its first stdout line ends with its port."""
    log = log_dir / f"{name}.log"
    with open(log, "ab") as err:
        popen = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE if announce else err,
            stderr=err,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
    try:
        port = None
        if announce:
            assert popen.stdout is not None
            line = b""
            deadline = time.monotonic() + timeout
            while not line.endswith(b"\n"):
                left = deadline - time.monotonic()
                if left <= 0 or popen.poll() is not None:
                    raise RuntimeError(
                        f"{name} did not announce a port (exit {popen.poll()}); "
                        f"log:\n{_log_tail(log)}"
                    )
                if select.select([popen.stdout], [], [], min(left, 0.2))[0]:
                    chunk = os.read(popen.stdout.fileno(), 4096)
                    if not chunk:
                        continue  # EOF: poll() above reports the exit
                    line += chunk
            port = int(line.decode().split("\n", 1)[0].rsplit(None, 1)[-1])
        yield popen, port, log
    finally:
        _stop(popen)


def _free_port() -> int:
    return free_port(HOST)


def _connects(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1.0):
            return True
    except OSError:
        return False


# ---------------------------------------------------------------- redis
@contextlib.contextmanager
def redis_server(log_dir: Path, timeout: float = 20.0) -> Iterator[Server]:
    """``redis-server`` without persistence; bulk strings up to 4 GiB allowed."""
    binary = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.access("/usr/bin/redis-server", os.X_OK) else None
    )
    if binary is None:
        raise PeerUnavailable("redis-server not found (Debian: apt-get install redis-server)")
    try:
        import redis
    except ImportError as exc:
        raise PeerUnavailable("redis-py not installed (pip install -e '.[bench]')") from exc
    version = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, timeout=10
    ).stdout.strip()
    # redis-server cannot listen on port 0 and announce it: pick a free port;
    # another process may take it first, so try a few.
    for attempt in range(3):
        port = _free_port()
        argv = [
            binary, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no",
            "--protected-mode", "no", "--proto-max-bulk-len", "4gb",
            "--client-query-buffer-limit", "4gb", "--dir", str(log_dir),
        ]  # fmt: skip
        name = f"redis-{attempt}"
        with _child(name, argv, log_dir, announce=False, timeout=timeout) as (popen, _, log):
            probe = redis.Redis(HOST, port, socket_connect_timeout=1.0, socket_timeout=2.0)

            def ping(probe: redis.Redis = probe) -> bool:
                try:
                    return bool(probe.ping())
                except redis.RedisError:
                    return False

            try:
                _wait_ready(name, popen, ping, timeout, log)
            except RuntimeError:
                if attempt == 2:
                    raise
                continue  # most likely the port was taken: try another
            finally:
                probe.close()
            server = version.split(" sha=")[0].removeprefix("Redis server ")
            yield Server(
                "redis",
                popen.pid,
                HOST,
                port,
                f"redis-server {server}, redis-py {redis.__version__}",
            )
            return


# ---------------------------------------------------------------- flight
@contextlib.contextmanager
def flight_server(log_dir: Path, timeout: float = 60.0) -> Iterator[Server]:
    """An Arrow Flight server in its own process holding tables in memory."""
    try:
        import pyarrow
        import pyarrow.flight as flight
    except ImportError as exc:
        raise PeerUnavailable("pyarrow (with Flight) not installed") from exc
    argv = [sys.executable, "-m", "bench.flight_server", "--host", HOST, "--port", "0"]
    with _child("flight", argv, log_dir, announce=True, timeout=timeout) as (popen, port, log):
        assert port is not None
        client = flight.connect(f"grpc://{HOST}:{port}")

        def ping() -> bool:
            try:
                list(client.do_action(flight.Action("ping", b"")))
            except flight.FlightError:
                return False
            return True

        try:
            _wait_ready("flight", popen, ping, timeout, log)
        finally:
            client.close()
        yield Server("flight", popen.pid, HOST, port, f"pyarrow {pyarrow.__version__}")


# ---------------------------------------------------------------- raw socket
@contextlib.contextmanager
def socket_server(log_dir: Path, timeout: float = 30.0) -> Iterator[Server]:
    """The raw-socket baseline server (bench/sock_server.py) in its own process."""
    argv = [sys.executable, "-m", "bench.sock_server", "--host", HOST, "--port", "0"]
    with _child("socket", argv, log_dir, announce=True, timeout=timeout) as (popen, port, log):
        assert port is not None
        _wait_ready("socket", popen, lambda: _connects(port), timeout, log)
        yield Server("socket", popen.pid, HOST, port, "python sendall/recv_into, one stream")


@contextlib.contextmanager
def log_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="tensorcache-bench-") as d:
        yield Path(d)
