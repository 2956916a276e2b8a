"""Byte budgets: eviction keeps every node within capacity; oversized values are refused."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest

import tensorcache
from tensorcache.apps.cluster import LocalCluster
from tensorcache.sizes import parse_size

from .helpers import TRANSPORTS, assert_same, raw_put, rpc_error, settled, tensor_header, total

pytestmark = pytest.mark.integration

KIB = 1024
MIB = 1024 * KIB


def value_for(i: int, nbytes: int) -> np.ndarray:
    """A uint8 tensor whose bytes identify ``i`` (so a wrong answer cannot pass)."""
    return ((np.arange(nbytes, dtype=np.uint32) * 7 + i) % 251).astype(np.uint8)


def assert_within_budget(stats) -> None:
    for s in stats:
        assert s.reachable, s
        assert s.bytes_used <= s.capacity, s
        assert s.bytes_used + s.bytes_reserved <= s.capacity, s


def test_lru_eviction_stays_within_budget(make_cluster, prefix):
    cl = make_cluster(3, capacity="8MiB", policy="lru")
    n = 100
    with tensorcache.connect(cl.router_address) as c:
        for i in range(n):
            c.put(f"{prefix}{i}", value_for(i, 256 * KIB))
            assert_within_budget(c.stats())
        stats = c.stats()
        assert {s.policy for s in stats} == {"lru"}
        assert total(stats, "evictions") > 0
        assert total(stats, "puts") == n
        # 25 MiB were written into 24 MiB: some keys are gone, the most recent are not.
        stored = total(stats, "keys")
        assert 0 < stored < n
        assert total(stats, "evictions") == n - stored

        # A node holds at least 31 of these tensors, so the last 30 puts are all resident.
        for i in range(n - 30, n):
            assert_same(c.get(f"{prefix}{i}"), value_for(i, 256 * KIB))

        before = c.stats()
        got = c.get_many([f"{prefix}{i}" for i in range(n)])
        after = c.stats()
        hits = 0
        for i in range(n):
            value = got[f"{prefix}{i}"]
            if value is not None:  # a miss is allowed; a wrong value never
                assert_same(value, value_for(i, 256 * KIB))
                hits += 1
        assert hits == stored
        assert total(after, "hits") - total(before, "hits") == hits
        assert total(after, "misses") - total(before, "misses") == n - hits
        assert_within_budget(after)


@pytest.mark.parametrize(
    ("policy", "hot_survives"), [("lru", True), ("lfu", True), ("fifo", False)]
)
def test_eviction_policies(make_cluster, prefix, policy, hot_survives):
    """A key read after every put survives LRU and LFU, but FIFO evicts it in turn."""
    cl = make_cluster(1, capacity="4MiB", policy=policy)
    size = 64 * KIB
    hot = value_for(10_000, size)
    with tensorcache.connect(cl.router_address) as c:
        c.put(prefix + "hot", hot)
        for i in range(150):  # ~2.3x the node's capacity
            c.put(f"{prefix}{i}", value_for(i, size))
            got = c.get(prefix + "hot")
            if got is not None:
                assert_same(got, hot)
            if i % 10 == 0:
                assert_within_budget(c.stats())
        (s,) = c.stats()
        assert s.policy == policy
        assert s.evictions > 0
        assert_within_budget([s])
        if hot_survives:
            assert_same(c.get(prefix + "hot"), hot)
        else:
            assert c.get(prefix + "hot") is None
        for i in range(140, 150):  # the newest entries are resident under every policy
            assert_same(c.get(f"{prefix}{i}"), value_for(i, size))


@pytest.fixture(scope="module")
def small_cluster(tmp_path_factory) -> Iterator[LocalCluster]:
    c = LocalCluster(3, capacity="8MiB", log_dir=tmp_path_factory.mktemp("small")).start()
    yield c
    c.stop()


@pytest.fixture
def residents(small_cluster, prefix):
    """A few entries that oversized puts must leave alone."""
    values = {f"{prefix}resident-{i}": value_for(i, 64 * KIB) for i in range(12)}
    with tensorcache.connect(small_cluster.router_address) as c:
        c.put_many(values)
    return values


def assert_residents_intact(c, values) -> None:
    got = c.get_many(list(values))
    for key, value in values.items():
        assert_same(got[key], value)


@pytest.mark.parametrize("path", ["data", "grpc"])
def test_value_larger_than_a_node_is_refused(small_cluster, prefix, residents, path):
    # 12 MiB is below the stripe size (one entry) but above a node's 8 MiB.
    with tensorcache.connect(
        small_cluster.router_address, stripe_size="16MiB", **TRANSPORTS[path]
    ) as c:
        before = c.stats()
        with pytest.raises(tensorcache.CapacityExceeded, match="capacity"):
            c.put(prefix + "big", value_for(0, 12 * MIB))
        assert c.get(prefix + "big") is None
        assert_residents_intact(c, residents)
        after = settled(c)
        assert total(after, "evictions") == total(before, "evictions")


def test_node_answers_resource_exhausted_for_oversized_entry(small_cluster, prefix):
    node = next(iter(small_cluster.nodes.values()))
    header = tensor_header((prefix + "big").encode(), b"", shape=[12 * MIB], nbytes=12 * MIB, crc=0)
    err = rpc_error(lambda: raw_put(node.address, [header]))  # refused before any payload
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert str(parse_size("8MiB")) in err.details()


def test_striped_value_larger_than_the_cluster_is_refused(small_cluster, prefix, residents):
    with tensorcache.connect(small_cluster.router_address, stripe_size="256KiB") as c:
        before = c.stats()
        with pytest.raises(tensorcache.CapacityExceeded):
            c.put(prefix + "huge", value_for(1, 96 * MIB))  # the cluster holds 24 MiB
        assert c.get(prefix + "huge") is None
        assert_residents_intact(c, residents)
        after = settled(c)
        assert total(after, "evictions") == total(before, "evictions")
        assert total(after, "shards") == total(before, "shards")  # no orphan stripes
        assert total(after, "bytes_used") == total(before, "bytes_used")
