"""Membership changes under a live client: joins, graceful leaves, crashes, restarts."""

from __future__ import annotations

import os
import signal

import grpc
import numpy as np
import pytest

import tensorcache
from tensorcache.errors import EPOCH_METADATA_KEY
from tensorcache.proto import tensorcache_pb2 as pb

from .helpers import (
    assert_same,
    get_request,
    node_stat,
    poll,
    raw_delete,
    raw_get,
    raw_put,
    rpc_error,
    tensor_header,
)

pytestmark = pytest.mark.integration


def values(prefix: str, n: int, offset: int = 0) -> dict[str, np.ndarray]:
    return {f"{prefix}{offset + i}": np.full(256, offset + i, dtype=np.int64) for i in range(n)}


def assert_miss_or_exact(got: dict, want: dict) -> int:
    """Every answer is a miss or exactly the value put; returns the number of hits."""
    hits = 0
    for key, value in want.items():
        if got[key] is not None:
            assert_same(got[key], value)
            hits += 1
    return hits


def wait_nodes_at_epoch(cluster, epoch: int) -> None:
    """Poll every node's own view until it has heard of ``epoch`` (heartbeats carry it)."""
    for proc in cluster.nodes.values():
        poll(
            lambda addr=proc.address: node_stat(addr).epoch == epoch,
            what=f"{proc.name} to reach epoch {epoch}",
        )


def test_join_refreshes_a_stale_client(make_cluster, prefix):
    cl = make_cluster(2)
    with (
        tensorcache.connect(cl.router_address) as c,
        tensorcache.connect(cl.router_address) as observer,
    ):
        early = values(prefix + "early-", 20)
        c.put_many(early)
        assert assert_miss_or_exact(c.get_many(list(early)), early) == len(early)
        old_epoch = c.epoch
        refreshes = c.metrics()["ring_refreshes"]

        new = cl.add_node()
        ring = cl.ring()
        assert ring.epoch > old_epoch
        assert new.name in {m.name for m in ring.members}

        def all_nodes_at_new_epoch() -> bool:
            stats = observer.stats()
            return len(stats) == 3 and all(s.reachable and s.epoch == ring.epoch for s in stats)

        poll(all_nodes_at_new_epoch, what="every node to report the new ring epoch")
        assert c.epoch == old_epoch  # the client still places with the old ring

        late = values(prefix + "late-", 200, offset=1000)
        c.put_many(late)
        assert c.epoch == ring.epoch
        m = c.metrics()
        assert m["ring_refreshes"] > refreshes
        assert m["retries"] >= 1

        by_name = {s.name: s for s in observer.stats()}
        assert by_name[new.name].keys > 0, "the new node received no keys"
        assert by_name[new.name].address == new.address
        assert assert_miss_or_exact(c.get_many(list(late)), late) == len(late)
        # Keys put before the join now belong partly to the new node: misses are fine.
        assert_miss_or_exact(c.get_many(list(early)), early)


def test_node_refuses_requests_placed_with_an_old_epoch(make_cluster, prefix):
    cl = make_cluster(2)
    old = cl.ring().epoch
    cl.add_node()
    new = cl.ring().epoch
    assert new > old
    wait_nodes_at_epoch(cl, new)
    key = (prefix + "k").encode()
    payload = b"payload"

    for proc in cl.nodes.values():
        calls = {
            "get": lambda a=proc.address: raw_get(a, get_request(key, epoch=old)),
            "put": lambda a=proc.address: raw_put(
                a, [tensor_header(key, payload, epoch=old), payload]
            ),
            "delete": lambda a=proc.address: raw_delete(
                a, pb.DeleteRequest(epoch=old, keys=[pb.EntryKey(key=key)])
            ),
        }
        for name, call in calls.items():
            err = rpc_error(call)
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, name
            trailers = dict(err.trailing_metadata() or ())
            assert trailers.get(EPOCH_METADATA_KEY) == str(new), (name, trailers)
            assert "stale epoch" in err.details()

        # The current epoch, a newer one (not heard of yet) and 0 (unplaced) are served.
        for epoch in (new, new + 1000, 0):
            reply, _ = raw_get(proc.address, get_request(key, epoch=epoch))
            assert reply.epoch == new
            assert not reply.entries[0].found


def test_graceful_leave(make_cluster, prefix):
    cl = make_cluster(3)
    with tensorcache.connect(cl.router_address) as c:
        vals = values(prefix, 60)
        c.put_many(vals)
        cl.stop_node("node-1")  # SIGTERM: deregisters, then drains
        ring = cl.wait_members({"node-0", "node-2"}, timeout=30)

        # The client still holds the ring with node-1: single gets and a batch
        # retry and refresh. node-1 handed its entries to their new owners
        # before exiting (drain), so every key is still a hit.
        for key in list(vals)[:10]:
            assert_same(c.get(key), vals[key])
        assert assert_miss_or_exact(c.get_many(list(vals)), vals) == len(vals)
        assert c.epoch == ring.epoch
        assert sum(s.handoffs for s in c.stats()) == 0  # drained ahead, not fetched on a miss

        c.put_many(vals)
        assert assert_miss_or_exact(c.get_many(list(vals)), vals) == len(vals)
        stats = c.stats()
        assert sorted(s.name for s in stats) == ["node-0", "node-2"]
        assert all(s.reachable for s in stats)


def test_killed_node_is_dropped_after_ttl(make_cluster, prefix):
    cl = make_cluster(3, ttl=2.0)
    with tensorcache.connect(cl.router_address) as c:
        old = values(prefix + "old-", 60)
        c.put_many(old)
        assert cl.stop_node("node-2", kill=True) == -signal.SIGKILL
        assert "node-2" in {m.name for m in cl.ring().members}  # no goodbye: still listed
        stats = {s.name: s for s in c.stats()}
        if "node-2" in stats:  # unless its lease already ran out
            assert not stats["node-2"].reachable
        assert stats["node-0"].reachable and stats["node-1"].reachable

        retries = c.metrics().get("retries", 0)
        fresh = values(prefix + "fresh-", 60, offset=100)
        c.put_many(fresh)  # keys of node-2 fail until its lease expires, then move
        assert c.metrics()["retries"] > retries

        ring = cl.wait_members({"node-0", "node-1"}, timeout=30)
        assert c.epoch == ring.epoch
        assert assert_miss_or_exact(c.get_many(list(fresh)), fresh) == len(fresh)
        assert assert_miss_or_exact(c.get_many(list(old)), old) < len(old)
        stats = c.stats()
        assert sorted(s.name for s in stats) == ["node-0", "node-1"]


def test_node_restarted_under_its_name_rejoins(make_cluster, prefix):
    cl = make_cluster(2)
    with tensorcache.connect(cl.router_address) as c:
        vals = values(prefix, 40)
        c.put_many(vals)
        cl.stop_node("node-1")
        cl.wait_members({"node-0"}, timeout=30)
        proc = cl.add_node("node-1")  # a new process on a new port, same identity
        cl.wait_members({"node-0", "node-1"}, timeout=30)

        # Keys of node-1 were lost with its process: misses, then puts refill them.
        assert_miss_or_exact(c.get_many(list(vals)), vals)
        c.put_many(vals)
        assert assert_miss_or_exact(c.get_many(list(vals)), vals) == len(vals)
        by_name = {s.name: s for s in c.stats()}
        assert by_name["node-1"].address == proc.address
        assert by_name["node-1"].keys > 0


def test_data_path_survives_the_router(make_cluster, prefix):
    """Bulk data never passes through the router: with it gone, reads and writes go on."""
    cl = make_cluster(2)
    with tensorcache.connect(cl.router_address) as c:
        vals = values(prefix, 30)
        c.put_many(vals)
        assert cl.router is not None
        cl.router.popen.send_signal(signal.SIGKILL)
        cl.router.popen.wait(30)

        assert assert_miss_or_exact(c.get_many(list(vals)), vals) == len(vals)
        more = values(prefix + "more-", 30, offset=500)
        c.put_many(more)
        assert assert_miss_or_exact(c.get_many(list(more)), more) == len(more)
        assert c.delete(next(iter(vals))) is True

    # A new client cannot learn the ring: a clean Unavailable, not a hang.
    with pytest.raises(tensorcache.Unavailable):
        tensorcache.connect(cl.router_address, timeout_s=1.0)


def test_paused_node_rejoins_after_its_lease_ran_out(make_cluster, prefix):
    cl = make_cluster(2, ttl=2.0)
    paused = cl.nodes["node-1"]
    with tensorcache.connect(cl.router_address) as c:
        vals = values(prefix, 40)
        c.put_many(vals)
        before = {s.name: s.keys for s in c.stats()}
        os.kill(paused.pid, signal.SIGSTOP)
        try:
            cl.wait_members({"node-0"}, timeout=30)  # no heartbeats: dropped after ttl
        finally:
            os.kill(paused.pid, signal.SIGCONT)
        # The router answers its next heartbeat "unknown"; it registers again.
        ring = cl.wait_members({"node-0", "node-1"}, timeout=30)
        wait_nodes_at_epoch(cl, ring.epoch)
        # Nothing was written meanwhile: every value reads back. The paused
        # node's copies were hidden until a read asked who held its keys
        # while it was away (nobody newer, no delete), then served again.
        got = c.get_many(list(vals))
        assert all(got[k] is not None for k in vals)
        assert assert_miss_or_exact(got, vals) == len(vals)
        stats = {s.name: s for s in c.stats()}
        assert stats["node-1"].reachable
        assert stats["node-1"].keys == before["node-1"]  # its data lived on
        assert stats["node-1"].revived == before["node-1"]


def test_no_stale_value_after_a_node_joins_and_leaves(make_cluster, prefix):
    """Read-your-writes across a membership flap: a get never returns an overwritten value."""
    cl = make_cluster(2)
    with tensorcache.connect(cl.router_address) as c:
        old = values(prefix, 100)
        c.put_many(old)  # v1 of every key, on node-0 / node-1
        cl.add_node("node-2")
        ring = cl.ring()
        wait_nodes_at_epoch(cl, ring.epoch)
        new = {k: v + 1_000_000 for k, v in old.items()}
        c.put_many(new)  # v2: about a third of the keys now live on node-2
        assert {s.name: s.keys for s in c.stats()}["node-2"] > 0
        cl.stop_node("node-2")
        ring = cl.wait_members({"node-0", "node-1"}, timeout=30)
        wait_nodes_at_epoch(cl, ring.epoch)
        got = c.get_many(list(new))
        stale = [k for k in new if got[k] is not None and np.array_equal(got[k], old[k])]
        assert not stale, f"{len(stale)} keys returned a value older than their last put"
        assert_miss_or_exact(got, new)


def test_the_router_hands_nodes_the_placements_before_its_ring(make_cluster):
    """GetRing(earlier=true): the member lists each join replaced, newest first
    (what a joiner needs to ask every earlier holder of a key, issue #8)."""
    cl = make_cluster(1)
    first = cl.ring()
    cl.add_node()
    second = cl.ring()
    cl.add_node()
    snap = cl.ring(earlier=True)
    names = [sorted(m.name for m in p.members) for p in snap.earlier]
    assert names[:2] == [
        sorted(m.name for m in second.members),
        sorted(m.name for m in first.members),
    ]
    assert [p.epoch for p in snap.earlier[:2]] == [second.epoch, first.epoch]
    assert snap.earlier[0].ended_ms_ago <= snap.earlier[1].ended_ms_ago
    assert not cl.ring().earlier  # clients do not ask, and get none
