"""Membership in etcd: two routers, one ring, nothing lost when a router restarts.

Every test starts a private etcd (tensorcache/etcdserver.py) and real
``tensorcache router --etcd`` and ``tensorcache node`` processes on loopback.
Nodes register with and heartbeat router A only; router B learns everything
from etcd. Waits poll with a deadline; nothing sleeps a fixed time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

import tensorcache
from tensorcache.etcdserver import EtcdServer, find_etcd, free_port
from tensorcache.grpcutil import CHANNEL_OPTIONS
from tensorcache.proto import tensorcache_pb2 as pb
from tensorcache.proto import tensorcache_pb2_grpc as pb_grpc

from .helpers import poll, read_line

pytestmark = pytest.mark.integration

TTL = 2.0
HEARTBEAT = 0.5
NAMES = {"n0", "n1", "n2"}


@pytest.fixture(scope="module")
def etcd_binary() -> str:
    binary = find_etcd()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("CI is set but no etcd binary was found: these tests must run in CI")
        pytest.skip("no etcd binary (install etcd, or put it on PATH)")
    return binary


@pytest.fixture
def etcd(etcd_binary: str) -> Iterator[EtcdServer]:
    with EtcdServer(etcd_binary) as server:
        yield server


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
        return self._spawn(
            name,
            [
                "router",
                "--port",
                str(port),
                "--etcd",
                self.etcd_url,
                "--heartbeat-interval",
                str(HEARTBEAT),
                "--ttl",
                str(TTL),
            ],
        )

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


@pytest.fixture
def procs(etcd: EtcdServer, tmp_path: Path) -> Iterator[Procs]:
    p = Procs(etcd.url, tmp_path)
    try:
        yield p
    finally:
        p.stop()


def ring(router: str) -> pb.RingSnapshot:
    with grpc.insecure_channel(router, options=CHANNEL_OPTIONS) as ch:
        return pb_grpc.RouterStub(ch).GetRing(pb.GetRingRequest(), timeout=5, wait_for_ready=True)


def names(snap: pb.RingSnapshot) -> set[str]:
    return {m.name for m in snap.members}


def agreed(*routers: str, want: set[str]) -> pb.RingSnapshot | None:
    """The common snapshot when every router lists ``want`` at the same epoch."""
    snaps = [ring(r) for r in routers]
    if all(names(s) == want for s in snaps) and len({s.epoch for s in snaps}) == 1:
        return snaps[0]
    return None


def stays(router: str, want: set[str], seconds: float) -> None:
    """Fail unless ``router`` lists ``want`` at every poll for ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        got = names(ring(router))
        assert want <= got, f"{router} dropped {sorted(want - got)}"
        time.sleep(0.1)


def three_nodes(procs: Procs, router: str) -> dict[str, subprocess.Popen[bytes]]:
    return {name: procs.node(name, router) for name in sorted(NAMES)}


def test_second_router_serves_the_same_ring(procs: Procs) -> None:
    _, a = procs.router("router-a")
    three_nodes(procs, a)
    poll(lambda: names(ring(a)) == NAMES, timeout=20, what="router A to list 3 nodes")
    _, b = procs.router("router-b")
    snap = poll(lambda: agreed(a, b, want=NAMES), timeout=10, what="A and B to agree")
    assert snap.epoch > 0
    assert [m.address for m in ring(a).members] == [m.address for m in ring(b).members]


def test_heartbeats_through_one_router_keep_nodes_in_the_other(procs: Procs) -> None:
    _, a = procs.router("router-a")
    _, b = procs.router("router-b")
    three_nodes(procs, a)
    poll(lambda: agreed(a, b, want=NAMES), timeout=20, what="A and B to list 3 nodes")
    # B never hears a heartbeat; only the leases A refreshes in etcd keep them.
    stays(b, NAMES, 2.5 * TTL)


def test_killed_node_leaves_both_rings_at_a_larger_epoch(procs: Procs) -> None:
    _, a = procs.router("router-a")
    _, b = procs.router("router-b")
    nodes = three_nodes(procs, a)
    before = poll(lambda: agreed(a, b, want=NAMES), timeout=20, what="3 nodes").epoch
    nodes["n1"].send_signal(signal.SIGKILL)
    nodes["n1"].wait(10)
    after = poll(lambda: agreed(a, b, want=NAMES - {"n1"}), timeout=TTL + 8, what="n1 to expire")
    assert after.epoch > before


def test_restarted_router_loses_nothing(procs: Procs) -> None:
    port = free_port()  # fixed, so nodes find router A again at the same address
    router_a, a = procs.router("router-a", port)
    _, b = procs.router("router-b")
    three_nodes(procs, a)
    before = poll(lambda: agreed(a, b, want=NAMES), timeout=20, what="3 nodes").epoch

    router_a.send_signal(signal.SIGTERM)
    assert router_a.wait(15) == 0
    _, again = procs.router("router-a2", port)
    assert again == a

    snap = poll(
        lambda: (s := agreed(a, b, want=NAMES)) is not None and s.epoch >= before and s,
        timeout=TTL + 10,
        what="restarted router A to serve the same ring",
    )
    assert snap.epoch >= before
    # The nodes heartbeat the new router A; B keeps them only through etcd.
    stays(b, NAMES, 1.5 * TTL)


def test_client_through_other_router(procs: Procs) -> None:
    _, a = procs.router("router-a")
    _, b = procs.router("router-b")
    three_nodes(procs, a)
    poll(lambda: agreed(a, b, want=NAMES), timeout=20, what="A and B to list 3 nodes")
    values = {f"etcd/{i}": np.arange(i * 1000, dtype=np.float32).reshape(-1, 10) for i in (1, 7)}
    with tensorcache.connect(b) as client:
        for key, value in values.items():
            client.put(key, value)
        for key, value in values.items():
            got = client.get(key)
            assert got is not None
            np.testing.assert_array_equal(got, value)
            assert got.dtype == value.dtype


def table(snap: pb.RingSnapshot) -> dict[str, int]:
    return {i.prefix: i.epoch for i in snap.invalidations}


def test_invalidation_through_one_router_reaches_the_other_at_the_same_epoch(
    procs: Procs,
) -> None:
    _, a = procs.router("router-a")
    _, b = procs.router("router-b")
    three_nodes(procs, a)
    poll(lambda: agreed(a, b, want=NAMES), timeout=20, what="A and B to list 3 nodes")
    with grpc.insecure_channel(a, options=CHANNEL_OPTIONS) as ch:
        stub = pb_grpc.RouterStub(ch)
        gen = stub.Invalidate(pb.InvalidateRequest(prefix="models/"), timeout=10).generation
        status = stub.Status(pb.RouterStatusRequest(), timeout=10)
    assert table(ring(a)) == {"models/": gen}  # A's view holds it once the call returns
    assert (status.state, status.membership, status.members) == ("ok", procs.etcd_url, 3)
    snap = poll(
        lambda: (s := agreed(a, b, want=NAMES)) is not None and s.epoch >= gen and s,
        timeout=10,
        what="B to reach the invalidation's epoch",
    )
    assert table(snap) == table(ring(b)) == {"models/": gen}


def test_watch_mode_falls_back_to_strict_on_a_router_its_nodes_do_not_publish_to(procs):
    """Nodes publish key events to the router they registered with. A watch-mode
    client of another router would miss them, so that router reports its stream
    incomplete and the client revalidates every hit (strict) instead of serving
    stale copies; on the nodes' own router the stream is complete."""
    import numpy as np

    import tensorcache

    _, a = procs.router("router-a")
    _, b = procs.router("router-b")
    procs.node("n0", a)
    procs.node("n1", a)
    poll(lambda: len(ring(b).members) == 2, what="router b to see both nodes")
    v1, v2 = np.arange(1000, dtype=np.int64), np.arange(1000, dtype=np.int64) * 2
    with (
        tensorcache.connect(b, near_cache="16MiB", near_cache_mode="watch") as on_b,
        tensorcache.connect(a, near_cache="16MiB", near_cache_mode="watch") as on_a,
        tensorcache.connect(a) as writer,
    ):
        poll(lambda: on_a._watch.live, timeout=30, what="router a's stream complete")
        # Router b hears from no node: after its grace period it says incomplete.
        poll(
            lambda: on_b._watch._last > 0 and not on_b._watch._complete,
            timeout=30,
            what="router b's stream incomplete",
        )
        writer.put("w/k", v1)
        np.testing.assert_array_equal(on_b.get("w/k"), v1)  # fills b's near-cache
        np.testing.assert_array_equal(on_a.get("w/k"), v1)
        writer.put("w/k", v2)
        # Strict on b: the very next get sees v2, no push needed.
        np.testing.assert_array_equal(on_b.get("w/k"), v2)
        assert on_b.metrics()["near_stale"] >= 1
        poll(lambda: np.array_equal(on_a.get("w/k"), v2), timeout=10, what="push to a's client")
