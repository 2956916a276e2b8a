"""A local multi-process cluster: one router and N nodes on 127.0.0.1.

Used by ``tensorcache up``, the demo, the benchmarks and the integration
tests, so all of them run the real processes the same way. Every child
listens on a free port (port 0) and announces its address on its first
stdout line; readiness is then *polled* (the router's ring lists every
node), never assumed after a sleep. Children arm PR_SET_PDEATHSIG (parentdeath) so they
die with the launcher even if it is killed with SIGKILL (no orphans).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from tensorcache import parentdeath
from tensorcache.etcdserver import EtcdServer, find_etcd
from tensorcache.grpcutil import CHANNEL_OPTIONS
from tensorcache.proto import tensorcache_pb2 as pb
from tensorcache.proto import tensorcache_pb2_grpc as pb_grpc
from tensorcache.sizes import parse_size

# glibc's dynamic mmap threshold grows after the first large free, after
# which multi-MiB chunks come from the heap and fragment it; a fixed
# threshold keeps chunks mmapped and returned to the OS on eviction.
NODE_ENV_DEFAULTS = {
    "MALLOC_MMAP_THRESHOLD_": str(1024 * 1024),
    "MALLOC_ARENA_MAX": "4",
}


_LINUX = sys.platform.startswith("linux")


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    address: str
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None


def _spawn(args: list[str], name: str, log_dir: Path, env: dict[str, str], timeout: float) -> Proc:
    log_path = log_dir / f"{name}.log"
    with open(log_path, "ab") as log:
        popen = subprocess.Popen(
            [sys.executable, "-m", "tensorcache", *args],
            stdout=subprocess.PIPE,
            stderr=log,
            stdin=subprocess.DEVNULL,
            env=env,
        )
    assert popen.stdout is not None
    deadline = time.monotonic() + timeout
    line = b""
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or popen.poll() is not None:
            popen.kill()
            popen.wait()
            tail = log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{name} did not start (exit {popen.returncode}); log tail:\n{tail}")
        ready, _, _ = select.select([popen.stdout], [], [], min(left, 0.2))
        if ready:
            # os.read on the raw fd: a buffered read would pull bytes into
            # Python's buffer where select() can no longer see them.
            line += os.read(popen.stdout.fileno(), 4096)
    address = line.decode().split("\n", 1)[0].rsplit(" ", 1)[-1].strip()
    return Proc(name, popen, address, log_path)


class LocalCluster:
    """Router + nodes as child processes; a context manager that cleans up."""

    def __init__(
        self,
        nodes: int = 3,
        *,
        capacity: str | int = "1GiB",
        policy: str = "lru",
        port: int = 0,
        stripe_size: str | int = "8MiB",
        heartbeat_interval: float = 0.5,
        ttl: float = 3.0,
        log_dir: str | Path | None = None,
        env: dict[str, str] | None = None,
        startup_timeout: float = 60.0,
        etcd: str | None = None,
    ) -> None:
        """``etcd``: None or "none" keeps membership in the router (embedded);
        "auto" starts a private etcd when the binary is installed (else
        embedded); a URL uses that etcd."""
        if nodes < 0:
            raise ValueError(f"nodes must be >= 0, got {nodes}")
        self.n_nodes = nodes
        self.capacity = parse_size(capacity)
        self.policy = policy
        self.port = port
        self.stripe_size = parse_size(stripe_size)
        self.heartbeat_interval = heartbeat_interval
        self.ttl = ttl
        self.startup_timeout = startup_timeout
        self._tmp = None if log_dir else tempfile.TemporaryDirectory(prefix="tensorcache-")
        self.log_dir = Path(log_dir) if log_dir else Path(self._tmp.name)  # type: ignore[union-attr]
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.env = {
            **os.environ,
            **{k: v for k, v in NODE_ENV_DEFAULTS.items() if k not in os.environ},
        }
        self.env.update(env or {})
        self.env[parentdeath.ENV] = str(os.getpid())  # children die with us
        self.router: Proc | None = None
        self.nodes: dict[str, Proc] = {}
        self.etcd = None if etcd in (None, "", "none") else etcd
        self.etcd_url = ""  # resolved at start; "" = embedded membership
        self._etcd_server: EtcdServer | None = None
        self._next = 0

    @property
    def router_address(self) -> str:
        if self.router is None:
            raise RuntimeError("cluster not started")
        return self.router.address

    @property
    def membership(self) -> str:
        """Where membership lives, in words (for `up`)."""
        if not self.etcd_url:
            return "embedded in the router"
        private = " (private, started for this cluster)" if self._etcd_server else ""
        return f"etcd {self.etcd_url}{private}"

    def _resolve_etcd(self) -> None:
        if self.etcd is None:
            return
        if self.etcd != "auto":
            self.etcd_url = self.etcd
            return
        if find_etcd() is None:
            return  # no etcd installed: embedded membership
        self._etcd_server = EtcdServer(
            # etcd is not ours to change, so its death signal is armed between
            # fork and exec; arm() is one prctl call with libc loaded already.
            data_root=self.log_dir,
            preexec_fn=parentdeath.arm if _LINUX else None,
        ).start()
        self.etcd_url = self._etcd_server.url

    def start(self) -> LocalCluster:
        try:
            self._resolve_etcd()
            etcd_args = ["--etcd", self.etcd_url] if self.etcd_url else []
            self.router = _spawn(
                [
                    "router",
                    "--port",
                    str(self.port),
                    "--stripe-size",
                    str(self.stripe_size),
                    "--heartbeat-interval",
                    str(self.heartbeat_interval),
                    "--ttl",
                    str(self.ttl),
                    *etcd_args,
                ],
                "router",
                self.log_dir,
                self.env,
                self.startup_timeout,
            )
            for _ in range(self.n_nodes):
                self.add_node(wait=False)
            self.wait_members(set(self.nodes), self.startup_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def add_node(
        self,
        name: str | None = None,
        *,
        capacity: str | int | None = None,
        policy: str | None = None,
        wait: bool = True,
    ) -> Proc:
        """Start one more node (it joins the ring); waits until the router lists it."""
        if name is None:
            name = f"node-{self._next}"
            self._next += 1
        cap = parse_size(capacity) if capacity is not None else self.capacity
        proc = _spawn(
            [
                "node",
                "--name",
                name,
                "--router",
                self.router_address,
                "--port",
                "0",
                "--capacity",
                str(cap),
                "--policy",
                policy or self.policy,
            ],
            name,
            self.log_dir,
            self.env,
            self.startup_timeout,
        )
        self.nodes[name] = proc
        if wait:
            self.wait_members(set(self.nodes), self.startup_timeout)
        return proc

    def ring(self) -> pb.RingSnapshot:
        with grpc.insecure_channel(self.router_address, options=CHANNEL_OPTIONS) as ch:
            return pb_grpc.RouterStub(ch).GetRing(
                pb.GetRingRequest(), timeout=5, wait_for_ready=True
            )

    def wait_members(self, names: set[str], timeout: float) -> pb.RingSnapshot:
        """Poll the router until its ring lists exactly ``names``."""
        deadline = time.monotonic() + timeout
        while True:
            snap = self.ring()
            if {m.name for m in snap.members} == names:
                return snap
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"ring has {sorted(m.name for m in snap.members)}, want {sorted(names)}"
                )
            time.sleep(0.05)

    def stop_node(self, name: str, *, kill: bool = False, timeout: float = 15.0) -> int:
        """SIGTERM (graceful: leaves the ring first) or SIGKILL one node; returns its exit code."""
        proc = self.nodes.pop(name)
        proc.popen.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            return proc.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.popen.kill()
            return proc.popen.wait()

    def stop(self, timeout: float = 15.0) -> None:
        """Stop nodes (they leave the ring first), then the router.

        SIGTERM, then SIGKILL for whatever is still running after ``timeout``.
        """
        for group in (list(self.nodes.values()), [self.router] if self.router else []):
            for p in group:
                if p.alive():
                    p.popen.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            for p in group:
                try:
                    p.popen.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.popen.kill()
                    p.popen.wait()
                if p.popen.stdout:
                    p.popen.stdout.close()
        self.nodes.clear()
        self.router = None
        if self._etcd_server is not None:
            self._etcd_server.stop()
            self._etcd_server = None
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                self._tmp.cleanup()

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
