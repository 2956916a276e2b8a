"""A local multi-process cluster: one router and N nodes on 127.0.0.1.

Used by ``tensorcache up``, the demo, the benchmarks and the integration
tests, so all of them run the real processes the same way. Every child
listens on a free port (port 0) and announces its address on its first
stdout line; readiness is then *polled* (the router's ring lists every
node), never assumed after a sleep. Children arm PR_SET_PDEATHSIG (parentdeath) so they
die with the launcher even if it is killed with SIGKILL (no orphans).

Faults, for the tests and the consistency checker: ``stop_node``/``start_node``
(any signal; the node comes back with its name, capacity and policy),
``restart_router`` (same port), ``stop_etcd``/``start_etcd``/``restart_etcd``
(the private etcd, same URL and data directory), ``pause_etcd``/``resume_etcd``
(a hung etcd).
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tensorcache.apps import parentdeath
from tensorcache.apps.etcdserver import EtcdServer, find_etcd
from tensorcache.auth import TOKEN_ENV
from tensorcache.authgrpc import Credentials
from tensorcache.grpcutil import CHANNEL_OPTIONS
from tensorcache.proto import tensorcache_pb2 as pb
from tensorcache.proto import tensorcache_pb2_grpc as pb_grpc
from tensorcache.sizes import parse_size
from tensorcache.tls import TLSFiles

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
    #: host:port of its /metrics ("" when started without --metrics-port).
    metrics_address: str = ""

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None


def _spawn(args: list[str], name: str, log_dir: Path, env: dict[str, str], timeout: float) -> Proc:
    log_path = log_dir / f"{name}.log"
    with open(log_path, "ab") as log:
        popen = parentdeath.popen(
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
    first = line.decode().split("\n", 1)[0]
    address = first.rsplit(" ", 1)[-1].strip()
    found = re.search(r" metrics (\S+) listening on ", first)
    metrics = found.group(1) if found else ""
    return Proc(name, popen, address, log_path, metrics)


def _stop(proc: Proc, sig: signal.Signals, timeout: float) -> int:
    """Send ``sig`` and wait for the exit (SIGKILL after ``timeout``); returns the exit code."""
    if proc.alive():
        proc.popen.send_signal(sig)
    try:
        code = proc.popen.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.popen.kill()
        code = proc.popen.wait()
    if proc.popen.stdout:
        proc.popen.stdout.close()
    return code


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
        replicas: int = 1,
        router_args: list[str] | None = None,
        node_args: list[str] | None = None,
        disk_path: str | Path | None = None,
        disk_capacity: str | int | None = None,
        pinned_capacity: str | int | None = None,
        metrics: bool | int = False,
    ) -> None:
        """``etcd``: None or "none" keeps membership in the router (embedded);
        "auto" starts a private etcd when the binary is installed (else
        embedded); a URL uses that etcd. ``replicas``: copies of each entry
        (the router publishes it in every ring). ``router_args``: more
        ``tensorcache router`` options (e.g. ``["--etcd-timeout", "2"]``).
        ``metrics``: every process serves Prometheus metrics
        (``Proc.metrics_address``): True on free ports; a port number P puts
        the router's on P and node i's on P + 1 + i (``up --metrics-port``)."""
        if nodes < 0:
            raise ValueError(f"nodes must be >= 0, got {nodes}")
        if replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {replicas}")
        self.replicas = replicas
        # False: none; True (or 0): free ports; P: router on P, node i on P + 1 + i.
        self.metrics_base: int | None = (
            None if metrics is False else 0 if metrics is True else int(metrics)
        )
        metrics_args = (
            [] if self.metrics_base is None else ["--metrics-port", str(self.metrics_base)]
        )
        self.router_args = [*metrics_args, *(router_args or [])]
        self.node_args = list(node_args or [])  # more `tensorcache node` flags, every node
        # A disk tier per node, in DIR/<node name>: a node started again under
        # its name finds its files (warm restart).
        if disk_path is not None and disk_capacity is None:
            raise ValueError("disk_capacity is required with disk_path")
        self.disk_path = Path(disk_path) if disk_path is not None else None
        self.disk_capacity = parse_size(disk_capacity) if disk_capacity is not None else 0
        if pinned_capacity is not None:  # per node; default: half of capacity (node/pins.py)
            self.node_args += ["--pinned-capacity", str(parse_size(pinned_capacity))]
        self.n_nodes = nodes
        self.capacity = parse_size(capacity)
        self.policy = policy
        self.port = port
        self.stripe_size = parse_size(stripe_size)
        self.heartbeat_interval = heartbeat_interval
        self.ttl = ttl
        self.startup_timeout = startup_timeout
        self._tmp = None if log_dir else tempfile.TemporaryDirectory(prefix="tensorcache-")
        self.log_dir = Path(log_dir) if log_dir else Path(self._tmp.name)  # type: ignore[union-attr]  # set when log_dir is not
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
        # How each node was started, so start_node() can bring a stopped one back.
        self._node_args: dict[str, tuple[int, str]] = {}

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
            self.start_router(self.port)
            for _ in range(self.n_nodes):
                self.add_node(wait=False)
            self.wait_members(set(self.nodes), self.startup_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    # ------------------------------------------------------------------ the router
    def start_router(self, port: int | None = None) -> Proc:
        """Start the router (``port``: None = the port it had before, 0 = any free one)."""
        if self.router is not None and self.router.alive():
            raise RuntimeError("the router is running; stop_router() first")
        if port is None:
            if self.router is None:
                raise RuntimeError("the router never ran: give a port")
            port = int(self.router.address.rsplit(":", 1)[1])
        etcd_args = ["--etcd", self.etcd_url] if self.etcd_url else []
        self.router = _spawn(
            [
                "router",
                "--port",
                str(port),
                "--stripe-size",
                str(self.stripe_size),
                "--heartbeat-interval",
                str(self.heartbeat_interval),
                "--ttl",
                str(self.ttl),
                "--replicas",
                str(self.replicas),
                *etcd_args,
                *self.router_args,
            ],
            "router",
            self.log_dir,
            self.env,
            self.startup_timeout,
        )
        return self.router

    def stop_router(self, *, kill: bool = False, timeout: float = 15.0) -> int:
        """SIGTERM (or SIGKILL) the router; returns its exit code. Nodes keep running."""
        if self.router is None:
            raise RuntimeError("cluster not started")
        return _stop(self.router, signal.SIGKILL if kill else signal.SIGTERM, timeout)

    def restart_router(self, *, kill: bool = False, timeout: float = 15.0) -> Proc:
        """Stop the router and start a new one on the same port.

        With embedded membership the new router starts with an empty ring
        and learns every node from its next heartbeat (known=False, so the
        node registers again); with etcd it reads the ring from etcd.
        """
        self.stop_router(kill=kill, timeout=timeout)
        return self.start_router()

    # ------------------------------------------------------------------ etcd
    def _private_etcd(self) -> EtcdServer:
        if self._etcd_server is None:
            raise RuntimeError("no private etcd: start the cluster with etcd='auto'")
        return self._etcd_server

    def stop_etcd(self, *, kill: bool = False) -> None:
        """Stop the private etcd, keeping its URL and data (start_etcd() brings it back)."""
        self._private_etcd().stop_process(kill=kill)

    def start_etcd(self) -> None:
        """Start the private etcd again on the same client URL and data dir; polls /health."""
        self._private_etcd().restart()

    def pause_etcd(self) -> None:
        """Freeze the private etcd (SIGSTOP): connected, answering nothing."""
        self._private_etcd().pause()

    def resume_etcd(self) -> None:
        self._private_etcd().resume()

    def restart_etcd(self, *, kill: bool = False) -> None:
        """Stop the private etcd and start it again on the same client URL and data dir."""
        self.stop_etcd(kill=kill)
        self.start_etcd()

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
        policy = policy or self.policy
        if name in self.nodes and self.nodes[name].alive():
            raise RuntimeError(f"{name} is already running")
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
                policy,
                *self._disk_args(name),
                *self._metrics_args(name),
                *self.node_args,
            ],
            name,
            self.log_dir,
            self.env,
            self.startup_timeout,
        )
        self.nodes[name] = proc
        self._node_args[name] = (cap, policy)
        if wait:
            self.wait_members(set(self.nodes), self.startup_timeout)
        return proc

    def _disk_args(self, name: str) -> list[str]:
        if self.disk_path is None:
            return []
        path = self.disk_path / name
        return ["--disk-path", str(path), "--disk-capacity", str(self.disk_capacity)]

    def _metrics_args(self, name: str) -> list[str]:
        if self.metrics_base is None:
            return []
        if self.metrics_base == 0:
            return ["--metrics-port", "0"]
        index = (
            list(self._node_args).index(name) if name in self._node_args else len(self._node_args)
        )
        return ["--metrics-port", str(self.metrics_base + 1 + index)]

    def ring(self, *, earlier: bool = False) -> pb.RingSnapshot:
        """The router's ring; ``earlier``: with the placements before it, as nodes ask."""
        # The cluster's own token and TLS files, if any.
        creds = Credentials(self.env.get(TOKEN_ENV) or None, TLSFiles.from_env(self.env))
        with creds.channel(self.router_address, CHANNEL_OPTIONS) as ch:
            snap: pb.RingSnapshot = pb_grpc.RouterStub(ch).GetRing(
                pb.GetRingRequest(earlier=earlier), timeout=5, wait_for_ready=True
            )
        return snap

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

    def stop_node(
        self,
        name: str,
        *,
        kill: bool = False,
        timeout: float = 15.0,
        sig: signal.Signals | None = None,
    ) -> int:
        """Stop one node and return its exit code.

        SIGTERM by default (graceful: it leaves the ring and drains first),
        SIGKILL with ``kill``, or any ``sig`` that ends the process; SIGKILL
        after ``timeout``. ``start_node(name)`` brings it back.
        """
        proc = self.nodes.pop(name)
        if sig is None:
            sig = signal.SIGKILL if kill else signal.SIGTERM
        return _stop(proc, sig, timeout)

    def start_node(self, name: str, *, wait: bool = True) -> Proc:
        """Start a node stopped by ``stop_node`` again: same name, capacity and policy."""
        if name not in self._node_args:
            raise KeyError(f"no node {name!r} was ever started in this cluster")
        capacity, policy = self._node_args[name]
        return self.add_node(name, capacity=capacity, policy=policy, wait=wait)

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
