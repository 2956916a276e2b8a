"""The soak's cluster: etcd, two routers behind a balancing route, nodes behind fault routes.

Addresses. Each node binds 127.0.0.1 on two fixed free ports (gRPC, data)
and advertises its own loopback address 127.0.0.(10 + i); the fault proxy
listens there on the same two ports and forwards to 127.0.0.1. The ring
therefore carries the proxy's address, and clients *and* peers reach the
node only through it. A restart under the same name keeps name, address and
ports (on Kubernetes: the same pod name and DNS name). Nodes bind with
``--no-local-readers``: a same-host read by ``process_vm_readv`` would go
around the proxy.

Routers: both bind 127.0.0.1 on fixed ports and share etcd; nodes and
clients reach them through one proxy route that tries them in turn (a
Kubernetes Service in front of router pods), so a router restart is a
reconnect, not an outage, and any router refreshes any node's lease.

Children start through ``parentdeath.popen`` with ``TENSORCACHE_PARENT_PID``
set, so they die with the soak even if it is SIGKILLed; etcd gets the
death signal in ``preexec_fn`` as in LocalCluster. Readiness is polled
(first stdout line, then the router's ring), never assumed after a sleep.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from tensorcache.apps import parentdeath
from tensorcache.apps.cluster import NODE_ENV_DEFAULTS
from tensorcache.apps.etcdserver import EtcdServer, free_port
from tensorcache.grpcutil import CHANNEL_OPTIONS
from tensorcache.proto import tensorcache_pb2 as pb
from tensorcache.proto import tensorcache_pb2_grpc as pb_grpc

from .proxy import FaultProxy

STARTUP_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
TTL_S = 3.0
HEARTBEAT_S = 0.5
DRAIN_TIMEOUT_S = 10.0
STRIPE_SIZE = "64KiB"


@dataclass
class Child:
    """A router or node process of the soak, and how to start it again."""

    name: str
    kind: str  # "router" | "node"
    args: list[str]
    ip: str = "127.0.0.1"
    ports: tuple[int, ...] = ()
    popen: subprocess.Popen[bytes] | None = None
    exits: list[int | None] = field(default_factory=list)  # codes of stops we asked for
    paused: bool = False

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def address(self) -> str:
        return f"{self.ip}:{self.ports[0]}"


class SoakCluster:
    def __init__(self, work: Path, *, capacity: int, replicas: int = 2) -> None:
        self.work = work
        self.capacity = capacity
        self.replicas = replicas
        self.proxy = FaultProxy()
        self.etcd: EtcdServer | None = None
        self.routers: dict[str, Child] = {}
        self.nodes: dict[str, Child] = {}
        self.router_address = ""
        self.proxy_stats: dict[str, dict[str, object]] = {}
        self.env = {
            **os.environ,
            **{k: v for k, v in NODE_ENV_DEFAULTS.items() if k not in os.environ},
            parentdeath.ENV: str(os.getpid()),
            # A child that will not stop is sent SIGABRT first: its threads' stacks go to its log.
            "PYTHONFAULTHANDLER": "1",
        }

    # ------------------------------------------------------------------ processes
    def _spawn(self, child: Child) -> None:
        log_path = self.work / f"{child.name}.log"
        with open(log_path, "ab") as log:
            popen = parentdeath.popen(
                [sys.executable, "-m", "tensorcache", *child.args],
                stdout=subprocess.PIPE,
                stderr=log,
                stdin=subprocess.DEVNULL,
                env=self.env,
            )
        assert popen.stdout is not None
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or popen.poll() is not None:
                popen.kill()
                popen.wait()
                tail = log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{child.name} did not start ({popen.returncode}):\n{tail}")
            ready, _, _ = select.select([popen.stdout], [], [], min(left, 0.2))
            if ready:
                line += os.read(popen.stdout.fileno(), 4096)
        child.popen = popen
        child.paused = False

    def start_child(self, child: Child, attempts: int = 5) -> None:
        """Start (or restart) ``child``; a port still held by the dead one is retried."""
        for attempt in range(attempts):
            try:
                self._spawn(child)
                return
            except RuntimeError:
                if attempt == attempts - 1:
                    raise
                time.sleep(0.5 * (attempt + 1))  # backoff before a retry, bounded by attempts

    def stop_child(self, child: Child, sig: signal.Signals, *, record: bool = True) -> int | None:
        """Send ``sig`` (SIGCONT first if paused) and wait; the exit code, None if killed."""
        if child.popen is None:
            return None
        if child.alive():
            child.popen.send_signal(sig)
            if child.paused:
                child.popen.send_signal(signal.SIGCONT)
                child.paused = False
        timeout = DRAIN_TIMEOUT_S + STOP_TIMEOUT_S
        code: int | None
        try:
            code = child.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            print(
                f"soak: {child.name} did not exit {timeout:.0f}s after {sig.name}; "
                "SIGABRT (stacks in its log), then SIGKILL",
                flush=True,
            )
            child.popen.send_signal(signal.SIGABRT)
            try:
                child.popen.wait(5.0)
            except subprocess.TimeoutExpired:
                child.popen.kill()
                child.popen.wait()
            code = None
        if child.popen.stdout:
            child.popen.stdout.close()
        if record and sig == signal.SIGTERM:
            child.exits.append(code)
        return code

    # ------------------------------------------------------------------ the cluster
    def start(self, nodes: int) -> SoakCluster:
        self.proxy.start()
        self.etcd = EtcdServer(data_root=self.work, preexec_fn=parentdeath.arm).start()
        ports = []
        for name in ("router-a", "router-b"):
            port = free_port()
            ports.append(port)
            self.routers[name] = Child(
                name,
                "router",
                [
                    "router",
                    "--port",
                    str(port),
                    "--etcd",
                    self.etcd.url,
                    "--replicas",
                    str(self.replicas),
                    "--ttl",
                    str(TTL_S),
                    "--heartbeat-interval",
                    str(HEARTBEAT_S),
                    "--stripe-size",
                    STRIPE_SIZE,
                ],
                ports=(port,),
            )
            self.start_child(self.routers[name])
        front = self.proxy.add_route("routers", ("127.0.0.1", 0), [("127.0.0.1", p) for p in ports])
        self.router_address = f"127.0.0.1:{front}"
        for i in range(nodes):
            self.add_node(f"node-{i}", wait=False)
        self.wait_whole(STARTUP_TIMEOUT_S)
        return self

    def add_node(self, name: str, *, wait: bool = True) -> Child:
        """Start ``name`` again where it was, or a new node on a new address and ports."""
        child = self.nodes.get(name)
        if child is None:
            ip = f"127.0.0.{10 + int(name.rsplit('-', 1)[1])}"
            grpc_port, data_port = self._ports_for(ip)
            for port in (grpc_port, data_port):
                self.proxy.add_route(name, (ip, port), [("127.0.0.1", port)])
            child = Child(
                name,
                "node",
                [
                    "node",
                    "--name",
                    name,
                    "--router",
                    self.router_address,
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(grpc_port),
                    "--data-port",
                    str(data_port),
                    "--advertise",
                    ip,
                    "--capacity",
                    str(self.capacity),
                    "--no-local-readers",
                    "--drain-timeout",
                    str(DRAIN_TIMEOUT_S),
                ],
                ip=ip,
                ports=(grpc_port, data_port),
            )
            self.nodes[name] = child
        self.start_child(child)
        if wait:
            self.wait_whole(STARTUP_TIMEOUT_S)
        return child

    @staticmethod
    def _ports_for(ip: str) -> tuple[int, int]:
        """Two ports free on 127.0.0.1 (the node) and on ``ip`` (the proxy)."""
        for _ in range(50):
            a, b = free_port(), free_port()
            if a != b and _free(ip, a) and _free(ip, b):
                return a, b
        raise RuntimeError(f"no two free ports for {ip}")

    def live_nodes(self) -> dict[str, str]:
        """{name: address} of nodes that should be in the ring (running, not paused)."""
        return {n: c.address for n, c in self.nodes.items() if c.alive() and not c.paused}

    def ring(self) -> dict[str, str]:
        with grpc.insecure_channel(self.router_address, options=CHANNEL_OPTIONS) as ch:
            snap = pb_grpc.RouterStub(ch).GetRing(pb.GetRingRequest(), timeout=5)
        return {m.name: m.address for m in snap.members}

    def incarnations(self) -> dict[str, int]:
        """{name: incarnation} of the ring's members (a number per process start)."""
        with grpc.insecure_channel(self.router_address, options=CHANNEL_OPTIONS) as ch:
            snap = pb_grpc.RouterStub(ch).GetRing(pb.GetRingRequest(), timeout=5)
        return {m.name: m.incarnation for m in snap.members}

    def wait_ring(self, ok: object, timeout: float, what: str) -> None:
        """Poll the ring until ``ok(members)``; TimeoutError after ``timeout``."""
        assert callable(ok)
        deadline = time.monotonic() + timeout
        members: dict[str, str] = {}
        while True:
            try:
                members = self.ring()
            except grpc.RpcError:
                members = {}
            if members and ok(members):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"after {timeout:.0f}s, {what}: ring {members}")
            time.sleep(0.1)

    def wait_whole(self, timeout: float) -> None:
        """Until the ring lists exactly the live nodes, each where it lives now."""
        self.wait_ring(
            lambda m: m == self.live_nodes(), timeout, f"want {sorted(self.live_nodes())}"
        )

    def repair_state(self) -> tuple[int, dict[str, tuple[int, int, int]]]:
        """The ring's epoch, and each member's (epoch seen, pending, demoted) from its Stat."""
        with grpc.insecure_channel(self.router_address, options=CHANNEL_OPTIONS) as ch:
            snap = pb_grpc.RouterStub(ch).GetRing(pb.GetRingRequest(), timeout=5)
        out: dict[str, tuple[int, int, int]] = {}
        for m in snap.members:
            with grpc.insecure_channel(m.address, options=CHANNEL_OPTIONS) as ch:
                s = pb_grpc.NodeStub(ch).Stat(pb.StatRequest(), timeout=5)
            out[m.name] = (s.epoch, s.pending, s.demoted)
        return snap.epoch, out

    def wait_repaired(self, timeout: float) -> float:
        """Until every member has re-replicated what the last fault cost; seconds waited.

        Repaired: each member runs the ring's current epoch, its rebalance has
        nothing pending (every entry it holds is at every member of its
        replica set) and it holds nothing demoted (moved copies dropped,
        hidden copies decided). The guarantee's "one crash at a time" means
        this much: a second crash before the first one's copies are made
        again can take a value's last copy on any R = 2 store, so the nemesis
        waits here, as an operator's rolling procedure waits for ``pending``
        0 in ``tensorcache stat`` (docs/operations.md).
        """
        start = time.monotonic()
        deadline = start + timeout
        last: object = None
        while True:
            try:
                epoch, state = self.repair_state()
                last = (epoch, state)
                if state and all(
                    e == epoch and pending == 0 and demoted == 0
                    for e, pending, demoted in state.values()
                ):
                    return time.monotonic() - start
            except grpc.RpcError as exc:
                last = f"{exc.code()}"  # a member restarting: ask again
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"after {timeout:.0f}s not re-replicated: ring epoch and "
                    f"{{node: (epoch, pending, demoted)}} {last}"
                )
            time.sleep(0.2)

    def children(self) -> list[Child]:
        return [*self.routers.values(), *self.nodes.values()]

    def stop(self) -> dict[str, int | None]:
        """SIGTERM every node (in parallel), then the routers; their exit codes."""
        codes: dict[str, int | None] = {}
        for group in (list(self.nodes.values()), list(self.routers.values())):
            running = [c for c in group if c.alive()]
            for c in running:
                assert c.popen is not None
                c.popen.send_signal(signal.SIGTERM)
                if c.paused:
                    c.popen.send_signal(signal.SIGCONT)
            for c in running:
                codes[c.name] = self.stop_child(c, signal.SIGTERM, record=False)
        if self.etcd is not None:
            self.etcd.stop()
        self.proxy_stats = self.proxy.stats()
        self.proxy.stop()
        return codes

    def kill_all(self) -> None:
        """Last resort on the way out: nothing of ours outlives the soak."""
        for c in self.children():
            if c.alive():
                assert c.popen is not None
                c.popen.kill()
                c.popen.wait()
        if self.etcd is not None:
            self.etcd.stop()
        self.proxy.stop()


def _free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True
