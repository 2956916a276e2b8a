"""A private, single-member etcd for ``tensorcache up --etcd auto`` and the tests.

It listens on free loopback ports, keeps its data in a temporary directory,
and is ready when its ``/health`` endpoint says so (polled, never assumed
after a sleep). Picking a port by binding and closing a socket can race
with another process; a start that fails is retried on fresh ports.

``stop_process()`` and ``restart()`` take etcd down and bring it back on the
same URL and data directory (the control-plane fault tests): the revision,
keys and leases survive, as they would for a restarted etcd in production.
``pause()`` and ``resume()`` freeze and thaw it (a hung etcd: connections
stay open, nothing answers).

``save_snapshot(path)`` is ``etcdctl snapshot save``; ``EtcdServer(snapshot=path)``
starts a new etcd from one (``etcdctl snapshot restore`` into a fresh data
directory, then etcd on it): the backup and restore of docs/operations.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path


def _ephemeral_range() -> tuple[int, int]:
    """The kernel's range for outgoing connections' local ports (Linux's default)."""
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (bound, then closed).

    It is drawn at random from *below* the kernel's ephemeral range. A port
    from ``bind(0)`` lies inside that range, so between the probe and the real
    bind any outgoing connection on the host (a client, a gRPC channel, another
    test) may take it as its local port: the pick-then-bind race that once
    failed a CI run with "Address already in use". Below the range only another
    listener picking the same random port can collide, and callers retry a
    start that fails on bind.
    """
    lo, _hi = _ephemeral_range()
    top = max(lo, 2048)
    bottom = max(1024, top - 16384)
    for _ in range(64):
        port = random.randrange(bottom, top)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # a crowded host
        s.bind((host, 0))
        found: int = s.getsockname()[1]
        return found


def find_etcdctl() -> str | None:
    """The etcdctl binary (Debian: the etcd-client package), or None."""
    found = shutil.which("etcdctl")
    if found:
        return found
    return "/usr/bin/etcdctl" if Path("/usr/bin/etcdctl").is_file() else None


def find_etcd() -> str | None:
    """The etcd binary: on PATH, or the distribution's /usr/bin/etcd."""
    found = shutil.which("etcd")
    if found:
        return found
    return "/usr/bin/etcd" if Path("/usr/bin/etcd").is_file() else None


class EtcdServer:
    """``with EtcdServer() as etcd: etcd.url`` -> "http://127.0.0.1:PORT"."""

    def __init__(
        self,
        binary: str | None = None,
        *,
        host: str = "127.0.0.1",
        startup_timeout: float = 20.0,
        attempts: int = 3,
        data_root: str | Path | None = None,
        preexec_fn: Callable[[], None] | None = None,
        snapshot: str | Path | None = None,
        etcdctl: str | None = None,
    ) -> None:
        """``snapshot``: start from this ``etcdctl snapshot save`` file, restored
        with ``etcdctl`` (default: found on PATH) into a fresh data directory."""
        self._data_root = data_root
        self._snapshot = Path(snapshot) if snapshot is not None else None
        self._etcdctl = etcdctl
        self._preexec_fn = preexec_fn
        binary = binary or find_etcd()
        if binary is None:
            raise FileNotFoundError("no etcd binary on PATH or at /usr/bin/etcd")
        self.binary = binary
        self.host = host
        self.startup_timeout = startup_timeout
        self.attempts = attempts
        self.url = ""
        self._popen: subprocess.Popen[bytes] | None = None
        self._data_dir: Path | None = None
        self._ports: tuple[int, int] = (0, 0)  # (client, peer) of the running etcd
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    @property
    def log_path(self) -> Path:
        if self._tmp is None:
            raise RuntimeError("etcd not started")
        return Path(self._tmp.name) / "etcd.log"

    def start(self) -> EtcdServer:
        self._tmp = tempfile.TemporaryDirectory(prefix="tensorcache-etcd-", dir=self._data_root)
        error = ""
        for attempt in range(self.attempts):
            try:
                data_dir = Path(self._tmp.name) / f"data-{attempt}"
                client, peer = free_port(self.host), free_port(self.host)
                if self._snapshot is not None:
                    self._restore(data_dir, peer)
                self._start_once(data_dir, client, peer)
                return self
            except RuntimeError as exc:
                error = str(exc)
        self.stop()
        raise RuntimeError(f"etcd did not start after {self.attempts} attempts: {error}")

    def _restore(self, data_dir: Path, peer: int) -> None:
        """``etcdctl snapshot restore`` into ``data_dir``, as member "tc" on ``peer``."""
        assert self._snapshot is not None
        peer_url = f"http://{self.host}:{peer}"
        self._run_etcdctl(
            "snapshot",
            "restore",
            str(self._snapshot),
            f"--data-dir={data_dir}",
            "--name=tc",
            f"--initial-cluster=tc={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
        )

    def save_snapshot(self, path: str | Path) -> Path:
        """``etcdctl snapshot save``: a consistent copy of the keyspace, taken live."""
        if not self.running:
            raise RuntimeError("etcd is not running")
        self._run_etcdctl(f"--endpoints={self.url}", "snapshot", "save", str(path))
        return Path(path)

    def _run_etcdctl(self, *args: str) -> None:
        etcdctl = self._etcdctl or find_etcdctl()
        if etcdctl is None:
            raise FileNotFoundError("no etcdctl on PATH or at /usr/bin/etcdctl (etcd-client)")
        done = subprocess.run(
            [etcdctl, *args],
            env={**os.environ, "ETCDCTL_API": "3"},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            out = (done.stdout + done.stderr).decode(errors="replace")[-1500:]
            raise RuntimeError(f"etcdctl {' '.join(args[:3])} failed ({done.returncode}): {out}")

    @property
    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def stop_process(self, *, kill: bool = False) -> None:
        """Stop etcd (SIGTERM, or SIGKILL with ``kill``) but keep its URL and data."""
        if self._popen is not None and kill and self._popen.poll() is None:
            self._popen.kill()
        self._kill()

    def pause(self) -> None:
        """Freeze etcd (SIGSTOP): it keeps its connections and answers nothing, like a hung host."""
        if not self.running:
            raise RuntimeError("etcd is not running")
        assert self._popen is not None
        self._popen.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Undo ``pause`` (SIGCONT)."""
        if not self.running:
            raise RuntimeError("etcd is not running")
        assert self._popen is not None
        self._popen.send_signal(signal.SIGCONT)

    def restart(self) -> EtcdServer:
        """Start etcd again on the same URL and data directory (stopping it first if up)."""
        if self._data_dir is None:
            raise RuntimeError("etcd was never started")
        self._kill()
        self._start_once(self._data_dir, *self._ports)
        return self

    def _start_once(self, data_dir: Path, client: int, peer: int) -> None:
        client_url, peer_url = f"http://{self.host}:{client}", f"http://{self.host}:{peer}"
        with open(self.log_path, "ab") as log:
            self._popen = subprocess.Popen(
                [
                    self.binary,
                    "--name=tc",
                    f"--data-dir={data_dir}",
                    f"--listen-client-urls={client_url}",
                    f"--advertise-client-urls={client_url}",
                    f"--listen-peer-urls={peer_url}",
                    f"--initial-advertise-peer-urls={peer_url}",
                    f"--initial-cluster=tc={peer_url}",
                ],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                preexec_fn=self._preexec_fn,
            )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._popen.poll() is not None:
                break
            if self._healthy(client_url):
                self.url = client_url
                self._data_dir, self._ports = data_dir, (client, peer)
                return
            time.sleep(0.05)
        self._kill()
        tail = self.log_path.read_text(errors="replace")[-1500:]
        raise RuntimeError(f"etcd on {client_url} not healthy; log tail:\n{tail}")

    @staticmethod
    def _healthy(client_url: str) -> bool:
        try:
            with urllib.request.urlopen(f"{client_url}/health", timeout=1) as reply:
                return bool(json.load(reply).get("health") == "true")
        except (OSError, ValueError, urllib.error.URLError):
            return False

    def _kill(self) -> None:
        if self._popen is None:
            return
        if self._popen.poll() is None:
            self._popen.send_signal(signal.SIGCONT)  # a paused etcd cannot act on SIGTERM
            self._popen.terminate()
            try:
                self._popen.wait(10)
            except subprocess.TimeoutExpired:
                self._popen.kill()
                self._popen.wait()
        self._popen = None

    def stop(self) -> None:
        self._kill()
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> EtcdServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
