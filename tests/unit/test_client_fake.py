"""The client's logic over the in-memory cluster (tensorcache.testing): no processes.

Placement, striping, failover, replica confirmation, conditional puts,
invalidation and membership changes, each against the real client and the
real node logic wired through the client's seams (client/nodes.py).
"""

from __future__ import annotations

import numpy as np
import pytest

from tensorcache.client import striping
from tensorcache.client.items import PutItem
from tensorcache.errors import CapacityExceeded, VersionConflict
from tensorcache.proto import tensorcache_pb2 as pb
from tensorcache.ring import Ring, RingMember
from tensorcache.testing import FakeCluster

pytestmark = pytest.mark.unit


@pytest.fixture
def three():
    with FakeCluster(["a", "b", "c"]) as cluster:
        yield cluster


def keys_held(cluster: FakeCluster) -> dict[str, int]:
    return {m.name: cluster.node(m.name).stat().keys for m in cluster.ring.members}


def test_a_key_lives_on_its_owner(three):
    c = three.connect()
    for i in range(30):
        c.put(f"k{i}", np.arange(i + 1))
    for i in range(30):
        owner = three.ring.owner(f"k{i}").name
        got, _ = _local_get(three, owner, f"k{i}")
        assert got.found
    assert sum(keys_held(three).values()) == 30
    assert all(n > 0 for n in keys_held(three).values())


def _local_get(cluster: FakeCluster, name: str, key: str):  # type: ignore[no-untyped-def]
    ops = cluster.node(name)
    reply, payload, _ = ops.get(
        pb.GetRequest(epoch=ops.epochs.epoch, keys=[pb.EntryKey(key=key.encode())])
    )
    return reply.entries[0], payload


def test_a_large_tensor_is_striped_over_nodes_and_read_back(three):
    c = three.connect(stripe_size="16KiB")
    value = np.arange(100_000, dtype=np.float32)  # 400 KB: 25 stripes
    version = c.put("big", value)
    np.testing.assert_array_equal(c.get("big"), value)
    assert c.version("big") == version
    shards = {m.name: three.node(m.name).stat().shards for m in three.ring.members}
    assert sum(shards.values()) == 25 and sum(n > 0 for n in shards.values()) >= 2
    out = np.empty_like(value)
    assert c.get("big", out=out) is out
    np.testing.assert_array_equal(out, value)


def test_a_lost_stripe_is_a_miss_never_garbage(three):
    c = three.connect(stripe_size="16KiB")
    c.put("big", np.arange(50_000, dtype=np.int32))
    manifest_owner = three.ring.owner("big").name
    got, _ = _local_get(three, manifest_owner, "big")
    stripe = got.meta.stripes[3].key
    owner = three.ring.owner(stripe.decode()).name
    ops = three.node(owner)
    ops.delete(
        pb.DeleteRequest(epoch=ops.epochs.epoch, keys=[pb.EntryKey(key=stripe, kind=pb.SHARD)])
    )
    assert c.get("big") is None
    assert c.metrics()["stripe_misses"] >= 1


def test_conditional_puts(three):
    c = three.connect()
    v1 = c.put("k", np.zeros(3), if_version=0)
    with pytest.raises(VersionConflict):
        c.put("k", np.ones(3), if_version=0)
    v2 = c.put("k", np.ones(3), if_version=v1)
    assert v2 > v1
    with pytest.raises(VersionConflict):
        c.put("k", np.full(3, 2.0), if_version=v1)
    np.testing.assert_array_equal(c.get("k"), np.ones(3))


def test_reads_fail_over_to_the_next_replica_at_once():
    with FakeCluster(["a", "b", "c"], replicas=2) as cluster:
        c = cluster.connect(stripe_size="16KiB")
        small = {f"s{i}": np.arange(i + 1) for i in range(20)}
        c.put_many(small)
        c.put("big", np.arange(40_000, dtype=np.int64))
        cluster.kill("a")
        got = c.get_many(list(small))
        for key, value in small.items():
            np.testing.assert_array_equal(got[key], value)
        np.testing.assert_array_equal(c.get("big"), np.arange(40_000, dtype=np.int64))
        assert c.metrics()["failovers"] > 0
        assert c.metrics().get("retries", 0) == 0  # no waiting on the ring


def test_a_primary_s_miss_is_confirmed_at_the_next_replica():
    """A new primary that has not got its copy yet must not turn a hit into a miss."""
    with FakeCluster(["a", "b", "c"], replicas=2) as cluster:
        c = cluster.connect()
        values = {f"k{i}": np.arange(i + 1) for i in range(60)}
        c.put_many(values)
        before = cluster.ring
        cluster.add_node("d")  # no settle(): d holds nothing yet
        moved = [k for k in values if cluster.ring.owner(k).name == "d"]
        assert moved
        got = c.get_many(list(values))
        for key, value in values.items():
            np.testing.assert_array_equal(got[key], value)
        assert before.epoch < cluster.ring.epoch


def test_a_chain_of_joins_and_a_drain_lose_nothing():
    with FakeCluster(["a"], stripe_size="16KiB") as cluster:
        c = cluster.connect()
        values = {f"k{i}": np.arange(i % 7 + 1) * i for i in range(200)}
        values["big"] = np.arange(30_000, dtype=np.float64)
        versions = c.put_many(values)
        cluster.add_node("b")
        cluster.add_node("c")  # before a scan: the chain case of issue #8
        assert cluster.settle() > 0
        cluster.remove_node("a")  # SIGTERM-style: it drains
        got = c.get_many(list(values))
        for key, value in values.items():
            np.testing.assert_array_equal(got[key], value)
            assert c.version(key) == versions[key]
        assert all(cluster.node(n).stat().evictions == 0 for n in ("b", "c"))


def test_invalidate_hides_the_namespace_everywhere():
    with FakeCluster(["a", "b"], replicas=2) as cluster:
        c = cluster.connect()
        c.put_many({"rev1/w": np.ones(4), "rev2/w": np.ones(4)})
        generation = c.invalidate("rev1/")
        assert generation >= cluster.ring.epoch - 1
        assert c.get("rev1/w") is None
        assert c.get("rev2/w") is not None
        c.put("rev1/w", np.zeros(4))  # written after: visible
        np.testing.assert_array_equal(c.get("rev1/w"), np.zeros(4))


def test_get_or_load_loads_once_then_reads():
    with FakeCluster(2) as cluster:
        c = cluster.connect()
        calls = []

        def load() -> np.ndarray:
            calls.append(1)
            return np.arange(5)

        np.testing.assert_array_equal(c.get_or_load("w", load), np.arange(5))
        np.testing.assert_array_equal(c.get_or_load("w", load), np.arange(5))
        assert len(calls) == 1


# ------------------------------------------------------------------ check_fits (#9 bug)
def test_check_fits_charges_each_copy_to_the_member_that_holds_it():
    """At R=2 every copy of a stripe used to be charged to the stripe's primary,
    so a put was refused although each replica had room for its copies."""
    members = [RingMember("a", "a", 1000), RingMember("b", "b", 1000)]
    ring = Ring(1, members, replicas=2, weight_unit=1)
    keys = [k for k in (f"s{i}" for i in range(200)) if ring.owner(k).name == "a"][:3]
    view = np.zeros(300, np.uint8)
    shards = [
        PutItem(k, pb.SHARD, pb.TensorMeta(), view, replica=r) for k in keys for r in range(2)
    ]
    striping.check_fits(ring, shards)  # a: 3 x 300, b: 3 x 300, both under 1000
    with pytest.raises(CapacityExceeded, match="node"):
        striping.check_fits(ring, [*shards, PutItem(keys[0], pb.SHARD, pb.TensorMeta(), view)])


def test_replica_copies_follow_a_ring_change_between_primary_and_replicas():
    """Found by the soak: the ring changed after the primary write, and the
    exact-version copy went to replica index 1 of the new ring, which was the
    old primary again, so the key's new primary never got a copy and the put
    returned with one copy at R=2. Replica copies now leave out the member
    that took the primary write."""
    with FakeCluster(["a", "b", "c"], replicas=2) as cluster:
        c = cluster.connect()
        real_put = cluster.transport.put
        joined = []

        def put(member, epoch, batch):  # type: ignore[no-untyped-def]
            real_put(member, epoch, batch)
            if not joined and not any(it.exact for it in batch):
                joined.append(True)
                cluster.add_node("d")  # between the primary and the replica writes

        cluster.transport.put = put  # type: ignore[method-assign]
        vals = {f"k{i}": np.arange(8) + i for i in range(300)}
        c.put_many(vals)
        assert joined
        ring = cluster.ring
        moved = 0
        for key in vals:
            holding = {m.name for m in ring.members if _local_get(cluster, m.name, key)[0].found}
            assert len(holding) >= 2, (key, holding, [m.name for m in ring.replica_set(key)])
            moved += ring.replica_set(key)[0].name == "d"
        assert moved > 0  # some keys' new primary is the node that joined


def test_stripe_copies_retried_after_a_crash_land_on_distinct_nodes():
    """Found by test_churn's kill -9 at R=2: a copy retried after its node died
    was placed by index in the new ring, where the key's other copy already
    was (the old primary moved to index 1): two copies on one node, and its
    crash lost the stripe. Retries now go to members without a copy."""
    with FakeCluster(["a", "b", "c"], replicas=2) as cluster:
        c = cluster.connect(stripe_size="4KiB")
        real_put = cluster.transport.put

        def put(member, epoch, batch):  # type: ignore[no-untyped-def]
            if member.name == "b" and "b" in {m.name for m in cluster.ring.members}:
                cluster.kill("b")  # dies as the put reaches it
                cluster.remove_node("b", drain=False)  # its lease expired
            real_put(member, epoch, batch)

        cluster.transport.put = put  # type: ignore[method-assign]
        value = np.arange(40_000, dtype=np.int64)  # 320 KB: 79 stripes of 4 KiB
        c.put("big", value)
        assert [m.name for m in cluster.ring.members] == ["a", "c"]
        shards = {name: cluster.node(name).stat().shards for name in ("a", "c")}
        assert shards["a"] == shards["c"] == 79, shards  # R=2 over two live nodes: both
        np.testing.assert_array_equal(c.get("big"), value)
