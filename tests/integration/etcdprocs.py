"""Router and node processes over one etcd, for the etcd tests (test_etcd*.py).

``Procs`` starts real ``tensorcache router --etcd`` and ``tensorcache node``
processes and kills them at teardown; the ``procs`` fixture (conftest.py)
gives each test its own over the module's ``etcd`` fixture.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import grpc

from tensorcache.grpcutil import CHANNEL_OPTIONS
from tensorcache.proto import tensorcache_pb2 as pb
from tensorcache.proto import tensorcache_pb2_grpc as pb_grpc

from .helpers import read_line

TTL = 2.0
HEARTBEAT = 0.5


class Procs:
    """Router and node processes of one test; all killed at teardown."""

    def __init__(self, etcd_url: str, log_dir: Path) -> None:
        self.etcd_url = etcd_url
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen[bytes]] = []
        self.nodes: list[subprocess.Popen[bytes]] = []

    def _spawn(self, name: str, args: list[str]) -> tuple[subprocess.Popen[bytes], str]:
        with open(self.log_dir / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "tensorcache", *args],
                stdout=subprocess.PIPE,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )
        self.procs.append(proc)
        return proc, read_line(proc, timeout=30).split()[-1]

    def router(self, name: str, port: int = 0) -> tuple[subprocess.Popen[bytes], str]:
        return self.spawn_router(name, ["--port", str(port)])

    def spawn_router(self, name: str, more: list[str]) -> tuple[subprocess.Popen[bytes], str]:
        args = ["router", "--etcd", self.etcd_url, "--heartbeat-interval", str(HEARTBEAT)]
        if "--port" not in more:
            args += ["--port", "0"]
        return self._spawn(name, [*args, "--ttl", str(TTL), *more])

    def node(self, name: str, router: str) -> subprocess.Popen[bytes]:
        args = ["node", "--name", name, "--router", router, "--port", "0"]
        proc = self._spawn(name, [*args, "--capacity", "64MiB"])[0]
        self.nodes.append(proc)
        return proc

    def stop(self) -> None:
        """Nodes first (they deregister through a router still up), then routers."""
        routers = [p for p in self.procs if p not in self.nodes]
        for group in (self.nodes, routers):
            for proc in group:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in group:
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                if proc.stdout is not None:
                    proc.stdout.close()


def ring(router: str) -> pb.RingSnapshot:
    with grpc.insecure_channel(router, options=CHANNEL_OPTIONS) as ch:
        return pb_grpc.RouterStub(ch).GetRing(pb.GetRingRequest(), timeout=5, wait_for_ready=True)


def names(snap: pb.RingSnapshot) -> set[str]:
    return {m.name for m in snap.members}


def table(snap: pb.RingSnapshot) -> dict[str, int]:
    return {i.prefix: i.epoch for i in snap.invalidations}
