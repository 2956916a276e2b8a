"""Warm rebalance on real processes: joins move ~1/N of the keys and lose none.

A join moves the keys the ring gives the new node; the new owner answers a
miss by a handoff from the previous owner, so every key still hits. A SIGTERM
drains a node's entries to their new owners before it exits. A node that
restarts under its name keeps the versions of its keys increasing.
(docs/consistency.md: "Warm rebalance", "Versions".)
"""

from __future__ import annotations

import re

import numpy as np
import pytest

import tensorcache
from tensorcache.wire import ring_from_snapshot

from .helpers import TRANSPORTS, assert_same, node_stat, poll, total

pytestmark = pytest.mark.integration


def values(prefix: str, n: int, size: int = 64) -> dict[str, np.ndarray]:
    return {f"{prefix}{i}": np.full(size, i, dtype=np.int64) for i in range(n)}


def wait_nodes_at_epoch(cluster, epoch: int) -> None:
    """Every node has installed the ring of ``epoch`` (it publishes the epoch after)."""
    for proc in cluster.nodes.values():
        poll(
            lambda addr=proc.address: node_stat(addr).epoch >= epoch,
            what=f"{proc.name} to reach epoch {epoch}",
        )


def stats_by_name(cluster) -> dict[str, object]:
    return {name: node_stat(p.address) for name, p in cluster.nodes.items()}


def join_one(cl, keys):  # type: ignore[no-untyped-def]
    """Add a node; wait until every node is at the new epoch.

    Returns (the new node, the ring after, the keys whose owner changed).
    """
    before = ring_from_snapshot(cl.ring())
    new = cl.add_node()
    after = ring_from_snapshot(cl.ring())
    wait_nodes_at_epoch(cl, after.epoch)
    moved = [k for k in keys if before.owner(k).name != after.owner(k).name]
    return new, after, moved


def test_a_join_moves_about_one_nth_of_the_keys(make_cluster, prefix):
    cl = make_cluster(4)
    vals = values(prefix, 2000, size=8)
    with tensorcache.connect(cl.router_address) as c:
        c.put_many(vals)
        new, after, moved = join_one(cl, vals)
        assert all(after.owner(k).name == new.name for k in moved)  # only to the new node
        n = len(after.members)
        assert 0.5 / n <= len(moved) / len(vals) <= 2 / n, len(moved)
        # Each moved key is pushed to its new owner, then dropped at the old
        # one ("moved"), whatever a get did first; nothing counts as evicted.
        poll(
            lambda: total(stats_by_name(cl).values(), "moved") == len(moved),
            timeout=30,
            what="every moved key confirmed at its new owner",
        )
        stats = stats_by_name(cl)
        assert total(stats.values(), "demoted") == 0
        assert total(stats.values(), "evictions") == 0

        got = c.get_many(list(vals))
        for key, value in vals.items():
            assert_same(got[key], value)
        # The new node got each moved key once: pushed by its previous owner
        # (re-replication) or fetched by handoff on a miss, whichever came first.
        poll(
            lambda: stats_by_name(cl)[new.name].keys == len(moved),
            timeout=30,
            what="the new node holding every moved key",
        )
        stats = stats_by_name(cl)
        pushed = sum(s.rereplicated for name, s in stats.items() if name != new.name)
        assert stats[new.name].handoffs + pushed >= len(moved)
        assert total(stats.values(), "keys") == len(vals)


@pytest.mark.parametrize("path", sorted(TRANSPORTS))
def test_every_key_still_hits_after_a_join(make_cluster, prefix, path):
    cl = make_cluster(3, stripe_size="256KiB")
    small = values(prefix + "s", 300)
    # Striped: manifest and stripes are separate keys, handed off separately.
    big = {f"{prefix}big{i}": np.arange(300_000, dtype=np.float32) * (i + 1) for i in range(4)}
    with tensorcache.connect(cl.router_address, **TRANSPORTS[path]) as c:
        c.put_many(small)
        for key, value in big.items():
            c.put(key, value)
        versions = {key: c.version(key) for key in big}
        cl.add_node()
        wait_nodes_at_epoch(cl, cl.ring().epoch)

        got = c.get_many(list(small))
        for key, value in small.items():
            assert_same(got[key], value)
        for key, value in big.items():
            assert_same(c.get(key), value)
            assert c.version(key) == versions[key]  # handed off with its version
        stats = c.stats()
        # Moved by re-replication or by handoff on a miss, whichever came first.
        assert total(stats, "handoffs") + total(stats, "rereplicated") > 0


def test_sigterm_drains_a_node_before_it_exits(make_cluster, prefix):
    cl = make_cluster(3)
    vals = values(prefix, 300)
    with tensorcache.connect(cl.router_address) as c:
        c.put_many(vals)
        leaving = cl.nodes["node-1"]
        held = node_stat(leaving.address).keys
        assert held > 0
        assert cl.stop_node("node-1") == 0  # SIGTERM: leave, drain, exit cleanly

        got = c.get_many(list(vals))
        for key, value in vals.items():
            assert_same(got[key], value)
        stats = c.stats()
        assert total(stats, "handoffs") == 0  # already there: pushed by the drain
        assert total(stats, "keys") == len(vals)
    log = leaving.log_path.read_text(errors="replace")
    drained = [int(n) for n in re.findall(r"drained (\d+) entries", log)]
    assert drained and drained[-1] == held, log[-2000:]


@pytest.mark.parametrize("kill", [False, True], ids=["sigterm", "sigkill"])
def test_versions_keep_increasing_across_a_node_restart(make_cluster, prefix, kill):
    cl = make_cluster(2)
    ring = ring_from_snapshot(cl.ring())
    key = next(f"{prefix}{i}" for i in range(1000) if ring.owner(f"{prefix}{i}").name == "node-1")
    with tensorcache.connect(cl.router_address) as c:
        v1 = c.put(key, np.arange(10))
        cl.stop_node("node-1", kill=kill)
        cl.wait_members({"node-0"}, timeout=30)
        v2 = c.put(key, np.arange(10) + 1)  # at node-0 now
        assert v2 > v1
        cl.add_node("node-1")
        snap = cl.wait_members({"node-0", "node-1"}, timeout=30)
        wait_nodes_at_epoch(cl, snap.epoch)
        assert ring_from_snapshot(snap).owner(key).name == "node-1"  # back where it was
        assert c.version(key) == v2  # handed off from node-0
        v3 = c.put(key, np.arange(10) + 2)
        assert v3 > v2
        assert c.version(key) == v3
        np.testing.assert_array_equal(c.get(key), np.arange(10) + 2)


def test_a_miss_at_the_new_owner_is_handed_off_from_the_previous_one(make_cluster, prefix):
    """Re-replication off: the new node warms only by handoff, one fetch per moved key."""
    cl = make_cluster(3, node_args=["--rereplicate-timeout", "0"])
    vals = values(prefix, 600, size=8)
    with tensorcache.connect(cl.router_address) as c:
        c.put_many(vals)
        new, _, moved = join_one(cl, vals)
        assert moved
        assert stats_by_name(cl)[new.name].keys == 0  # nothing pushed
        got = c.get_many(list(vals))
        for key, value in vals.items():
            assert_same(got[key], value)
        stats = stats_by_name(cl)
        assert stats[new.name].handoffs == len(moved)  # each moved key fetched once
        assert stats[new.name].keys == len(moved)  # and kept: the next get is a plain hit
        assert total(stats.values(), "keys") == len(vals)
