"""Replication: every entry on R distinct nodes; a dead node fails no get.

A kill -9 under load is the case that matters: the ring still lists the dead
node for up to its lease (ttl), so reads must move to the next replica by
themselves, without waiting for membership.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import tensorcache
from tensorcache.wire import ring_from_snapshot

from .helpers import poll

pytestmark = pytest.mark.integration

KIB = 1024


def _value(i: int, n: int = 4 * KIB) -> np.ndarray:
    return np.full(n // 4, i, dtype=np.int32)


def _stored_keys(c) -> int:
    return sum(s.keys for s in c.stats() if s.reachable)


def test_each_entry_is_stored_on_r_nodes(make_cluster):
    cluster = make_cluster(4, replicas=2)
    with tensorcache.connect(cluster.router_address) as c:
        assert cluster.ring().replicas == 2
        for i in range(40):
            c.put(f"r/{i}", _value(i))
        assert _stored_keys(c) == 80  # two copies of each, on distinct nodes
        for i in range(40):
            assert c.delete(f"r/{i}")
        assert _stored_keys(c) == 0  # a delete reaches every copy


def test_replicas_hold_the_primarys_version(make_cluster):
    cluster = make_cluster(3, replicas=3)
    with tensorcache.connect(cluster.router_address) as c:
        v1 = c.put("v/k", _value(1))
        v2 = c.put("v/k", _value(2))
        assert v2 > v1
        # Every node holds the key; kill two of them and read the third:
        # same value, same version.
        for name in sorted(cluster.nodes)[:2]:
            cluster.stop_node(name, kill=True)
        np.testing.assert_array_equal(c.get("v/k"), _value(2))
        assert c.version("v/k") == v2
        assert c.metrics().get("failovers", 0) >= 1


@pytest.mark.parametrize("striped", [False, True], ids=["small", "striped"])
def test_kill_9_under_load_fails_no_get(make_cluster, striped):
    """R=2, 4 readers looping over every key while one node is SIGKILLed."""
    cluster = make_cluster(4, replicas=2, ttl=2.0)
    size = 256 * KIB if striped else 4 * KIB
    keys = [f"load/{i}" for i in range(24)]
    opts = {"stripe_size": "64KiB"} if striped else {}
    with tensorcache.connect(cluster.router_address, **opts) as writer:
        for i, k in enumerate(keys):
            writer.put(k, _value(i, size))

    failures: list[str] = []
    reads = [0]
    stop = threading.Event()
    killed = threading.Event()
    lock = threading.Lock()

    def reader(seed: int) -> None:
        with tensorcache.connect(cluster.router_address, **opts) as c:
            rounds = 0
            deadline = time.monotonic() + 60
            while not stop.is_set() and rounds < 400 and time.monotonic() < deadline:
                for i, k in enumerate(keys[seed:] + keys[:seed]):
                    idx = (i + seed) % len(keys)
                    try:
                        got = c.get(k)
                    except tensorcache.TensorCacheError as exc:
                        with lock:
                            failures.append(f"{k}: {exc!r}")
                        continue
                    if got is None or not np.array_equal(got, _value(idx, size)):
                        with lock:
                            failures.append(f"{k}: {'miss' if got is None else 'wrong bytes'}")
                    with lock:
                        reads[0] += 1
                rounds += 1

    threads = [threading.Thread(target=reader, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    try:
        poll(lambda: reads[0] > 100, timeout=60, what="readers running")
        victim = sorted(cluster.nodes)[1]
        cluster.stop_node(victim, kill=True)
        killed.set()
        # Keep reading while the ring still lists the dead node and after it drops it.
        cluster.wait_members(set(cluster.nodes), timeout=30)
        before = reads[0]
        poll(lambda: reads[0] > before + 200, timeout=60, what="reads after the ring change")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert killed.is_set()
    assert failures == [], failures[:10]
    assert reads[0] > 300


def test_put_with_a_dead_replica_completes_on_the_new_replica_set(make_cluster):
    cluster = make_cluster(3, replicas=2, ttl=1.5)
    with tensorcache.connect(cluster.router_address, retries=8) as c:
        c.put("dead/0", _value(0))
        cluster.stop_node(sorted(cluster.nodes)[0], kill=True)
        # Writes to keys whose replica set held the dead node retry until the
        # ring drops it, then land on the survivors: both copies.
        versions = {f"dead/{i}": c.put(f"dead/{i}", _value(i)) for i in range(20)}
        assert all(v > 0 for v in versions.values())
        cluster.wait_members(set(cluster.nodes), timeout=30)
        assert _stored_keys(c) == 40
        for i in range(20):
            np.testing.assert_array_equal(c.get(f"dead/{i}"), _value(i))


def test_a_restarted_node_is_refilled_so_a_second_kill_loses_nothing(make_cluster):
    """Churn: kill -9 + restart one node (it comes back empty under its old name),
    then kill -9 another. Without re-replication the keys the two shared would
    have had one copy left, on the node killed second."""
    cluster = make_cluster(4, replicas=2, ttl=2.0)
    keys = {f"churn/{i}": _value(i) for i in range(120)}
    with tensorcache.connect(cluster.router_address) as c:
        c.put_many(keys)
        first, second = sorted(cluster.nodes)[:2]
        cluster.stop_node(first, kill=True)
        cluster.start_node(first)  # empty, same name: the ring's names are unchanged
        cluster.wait_members(set(cluster.nodes), timeout=30)

        def refilled() -> bool:
            return _stored_keys(c) >= 2 * len(keys)

        poll(refilled, timeout=60, what="peers pushing copies to the restarted node")
        cluster.stop_node(second, kill=True)
        for key, value in keys.items():
            np.testing.assert_array_equal(c.get(key), value)


@pytest.mark.parametrize("opts", [{}, {"transport": "grpc"}], ids=["data", "grpc"])
def test_a_get_fails_over_mid_stream(make_cluster, opts):
    """Large striped tensors read in a loop while the node serving them is killed:
    a stream cut short is finished from another replica, never returned torn."""
    cluster = make_cluster(3, replicas=2, ttl=2.0)
    big = np.random.default_rng(7).integers(0, 2**31, 16 * 1024 * 1024, dtype=np.int32)  # 64 MiB
    failures: list[str] = []
    gets = [0]
    with tensorcache.connect(
        cluster.router_address, stripe_size="16MiB", local_fastpath=False, **opts
    ) as c:
        c.put("mid/big", big)
        stop = threading.Event()

        def reader() -> None:
            deadline = time.monotonic() + 60
            while not stop.is_set() and gets[0] < 200 and time.monotonic() < deadline:
                try:
                    got = c.get("mid/big")
                except tensorcache.TensorCacheError as exc:
                    failures.append(repr(exc))
                    continue
                if got is None or not np.array_equal(got, big):
                    failures.append("miss" if got is None else "torn")
                gets[0] += 1

        t = threading.Thread(target=reader)
        t.start()
        try:
            poll(lambda: gets[0] >= 2, timeout=60, what="reads under way")
            primary = ring_from_snapshot(cluster.ring()).owner("mid/big").name
            cluster.stop_node(primary, kill=True)  # it serves the manifest of every get
            before = gets[0]
            poll(lambda: gets[0] >= before + 5, timeout=60, what="reads after the kill")
        finally:
            stop.set()
            t.join(timeout=120)
        assert failures == []
        assert c.metrics().get("failovers", 0) >= 1
