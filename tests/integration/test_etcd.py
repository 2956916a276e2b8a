"""Membership in etcd: two routers, one ring, nothing lost when a router restarts.

Every test starts a private etcd (tensorcache/apps/etcdserver.py) and real
``tensorcache router --etcd`` and ``tensorcache node`` processes on loopback.
Nodes register with and heartbeat router A only; router B learns everything
from etcd. Waits poll with a deadline; nothing sleeps a fixed time.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

import tensorcache
from tensorcache.apps.etcdserver import EtcdServer, free_port
from tensorcache.grpcutil import CHANNEL_OPTIONS
from tensorcache.proto import tensorcache_pb2 as pb
from tensorcache.proto import tensorcache_pb2_grpc as pb_grpc

from .etcdprocs import TTL, Procs, names, ring, table
from .helpers import poll

pytestmark = pytest.mark.integration

NAMES = {"n0", "n1", "n2"}


@pytest.fixture
def etcd(etcd_binary: str) -> Iterator[EtcdServer]:
    with EtcdServer(etcd_binary) as server:
        yield server


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


def _watch_clients(router_a: str, router_b: str):  # type: ignore[no-untyped-def]
    import tensorcache

    return (
        tensorcache.connect(router_b, near_cache="16MiB", near_cache_mode="watch"),
        tensorcache.connect(router_a, near_cache="16MiB", near_cache_mode="watch"),
        tensorcache.connect(router_a),
    )


def test_key_events_are_relayed_to_the_routers_the_nodes_do_not_use(procs):
    """Nodes publish to the router they registered with (a); router a relays to
    router b, so a watch-mode client of b gets pushes too (and b is complete)."""
    import numpy as np

    _, a = procs.router("router-a")
    _, b = procs.router("router-b")
    procs.node("n0", a)
    procs.node("n1", a)
    poll(lambda: len(ring(b).members) == 2, what="router b to see both nodes")
    on_b, on_a, writer = _watch_clients(a, b)
    with on_b, on_a, writer:
        poll(
            lambda: on_a.metrics()["watch_live"] and on_b.metrics()["watch_live"],
            timeout=30,
            what="both streams live",
        )
        v1, v2 = np.arange(1000, dtype=np.int64), np.arange(1000, dtype=np.int64) * 2
        writer.put("r/k", v1)
        for c in (on_a, on_b):
            np.testing.assert_array_equal(c.get("r/k"), v1)  # fills the near-caches
        writer.put("r/k", v2)
        for c in (on_a, on_b):
            poll(lambda c=c: np.array_equal(c.get("r/k"), v2), timeout=10, what="the push")
            assert c.metrics()["near_dropped_by_events"] >= 1


def test_watch_mode_is_strict_on_a_router_no_event_reaches(procs):
    """Router b advertises an address no peer can reach, so nothing is relayed to
    it: after its grace period its stream says incomplete, and its watch-mode
    client revalidates every hit instead of serving a stale copy."""
    import numpy as np

    _, a = procs.router("router-a")
    _, b = procs.spawn_router("router-b", ["--advertise", "127.0.0.2"])
    procs.node("n0", a)
    procs.node("n1", a)
    poll(lambda: len(ring(b).members) == 2, what="router b to see both nodes")
    on_b, on_a, writer = _watch_clients(a, b)
    with on_b, on_a, writer:
        poll(lambda: on_a.metrics()["watch_live"], timeout=30, what="router a's stream complete")
        poll(
            lambda: on_b.metrics()["watch_connected"] and not on_b.metrics()["watch_complete"],
            timeout=30,
            what="router b's stream incomplete",
        )
        v1, v2 = np.arange(1000, dtype=np.int64), np.arange(1000, dtype=np.int64) * 2
        writer.put("w/k", v1)
        np.testing.assert_array_equal(on_b.get("w/k"), v1)  # fills b's near-cache
        writer.put("w/k", v2)
        np.testing.assert_array_equal(on_b.get("w/k"), v2)  # strict: no push needed
        assert on_b.metrics()["near_stale"] >= 1
