"""Pinned entries in the node store (node/pins.py): never evicted, within a quota.

Pure logic: a Store with no node around it, plus FakeCluster (the real node
logic behind the client's seams) for the client's pin API and for a pin
following its entry when a node leaves. The same rules against real node
processes: tests/integration/test_pins.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from tensorcache.errors import CapacityExceeded, InvalidArgument
from tensorcache.node.pins import with_pin
from tensorcache.node.store import NewEntry, Store
from tensorcache.proto import tensorcache_pb2 as pb
from tensorcache.testing import FakeCluster

pytestmark = pytest.mark.unit

META = pb.TensorMeta(dtype="|u1", shape=[1], order="C", nbytes=1).SerializeToString()


def put(
    store: Store,
    key: str,
    cost: int,
    *,
    pinned: bool = False,
    strict: bool = True,
    version: int = 0,
) -> int:
    res = store.reserve(cost)
    try:
        [(v, _)] = store.commit(
            res,
            [
                NewEntry(
                    (0, key),
                    with_pin(META, pinned),
                    (b"x",),
                    cost,
                    version=version,
                    pinned=pinned,
                    pin_strict=strict,
                )
            ],
        )
    finally:
        store.release(res)
    return v


def held(store: Store, key: str) -> bool:
    return store.contains((0, key))


def test_pinned_entries_are_never_evicted():
    store = Store(10_000, "lru", pinned_capacity=5_000)
    put(store, "w0", 2_000, pinned=True)
    put(store, "w1", 2_000, pinned=True)
    for i in range(50):  # far more than the budget in unpinned puts
        put(store, f"a{i}", 1_000)
    assert held(store, "w0") and held(store, "w1")
    s = store.stats()
    assert s.pinned_bytes == 4_000 and s.pinned == 2 and s.pinned_capacity == 5_000
    assert s.evictions == 50 + 4 - 10  # only unpinned ones went: 6 of them fit beside the pins
    assert s.bytes_used <= s.capacity


@pytest.mark.parametrize("policy", ["lru", "lfu", "fifo"])
def test_every_policy_skips_pinned_entries(policy):
    store = Store(3_000, policy, pinned_capacity=1_000)
    put(store, "w", 1_000, pinned=True)
    for i in range(10):
        put(store, f"a{i}", 1_000)
        store.get((0, "w"))
    assert held(store, "w")


def test_a_pin_beyond_the_quota_is_refused_and_changes_nothing():
    store = Store(10_000, pinned_capacity=3_000)
    put(store, "w0", 2_000, pinned=True)
    put(store, "a", 1_000)
    with pytest.raises(CapacityExceeded, match="pinned quota"):
        put(store, "w1", 2_000, pinned=True)
    assert not held(store, "w1") and held(store, "a")
    s = store.stats()
    assert s.pinned_bytes == 2_000 and s.bytes_reserved == 0
    # check_pins (asked before a put's payload is received) agrees
    with pytest.raises(CapacityExceeded, match="--pinned-capacity 3000"):
        store.check_pins([NewEntry((0, "w1"), b"", (), 2_000, pinned=True, pin_strict=True)], "put")


def test_a_zero_quota_refuses_every_pin():
    store = Store(10_000, pinned_capacity=0)
    with pytest.raises(CapacityExceeded):
        put(store, "w", 1, pinned=True)


def test_quota_must_fit_in_the_capacity():
    with pytest.raises(ValueError, match="pinned capacity"):
        Store(1_000, pinned_capacity=1_001)
    assert Store(1_000).stats().pinned_capacity == 500  # default: half


def test_overwrite_credits_the_replaced_pin_and_takes_the_new_values_state():
    store = Store(10_000, pinned_capacity=3_000)
    put(store, "w", 2_500, pinned=True)
    put(store, "w", 3_000, pinned=True)  # fits only because the old 2,500 are credited
    assert store.stats().pinned_bytes == 3_000
    put(store, "w", 3_000)  # an unpinned overwrite: the pin belonged to the old value
    s = store.stats()
    assert s.pinned_bytes == 0 and s.pinned == 0
    for i in range(20):
        put(store, f"a{i}", 1_000)
    assert not held(store, "w")  # evictable now


def test_delete_frees_the_quota():
    store = Store(10_000, pinned_capacity=2_000)
    put(store, "w", 2_000, pinned=True)
    assert store.delete((0, "w")) is not None
    assert store.stats().pinned_bytes == 0
    put(store, "w2", 2_000, pinned=True)


def test_invalidation_drops_pinned_entries_too():
    gone: set[str] = set()
    store = Store(10_000, pinned_capacity=5_000, stale=lambda e: e.key[1] in gone)
    put(store, "rev1/w", 2_000, pinned=True)
    gone.add("rev1/w")
    assert not held(store, "rev1/w")
    assert store.stats().pinned_bytes == 0


def test_a_moved_copy_beyond_the_quota_is_kept_unpinned_and_counted():
    store = Store(10_000, pinned_capacity=2_000)
    put(store, "w0", 2_000, pinned=True)
    put(store, "w1", 1_000, pinned=True, strict=False, version=7)  # a handoff / push
    assert held(store, "w1")
    s = store.stats()
    assert s.pins_dropped == 1 and s.pinned_bytes == 2_000
    for i in range(20):
        put(store, f"a{i}", 1_000)
    assert not held(store, "w1") and held(store, "w0")


def test_pin_prefix_is_all_or_nothing_and_rewrites_the_metadata():
    store = Store(20_000, pinned_capacity=5_000)
    for i in range(3):
        put(store, f"m/rev1/{i}", 1_000)
    put(store, "m/rev2/0", 4_000)
    put(store, "other", 1_000)
    assert store.pin_prefix("m/rev1/", True) == (3, 3_000)
    assert store.pin_prefix("m/rev1/", True) == (0, 0)  # already pinned
    with pytest.raises(CapacityExceeded, match="pin 'm/'"):
        store.pin_prefix("m/", True)  # rev2 (4,000) does not fit beside 3,000
    assert store.stats().pinned_bytes == 3_000
    entry = store.peek((0, "m/rev1/0"))
    assert entry is not None and entry.pinned
    assert pb.TensorMeta.FromString(entry.meta).pinned  # travels with copies of it
    assert store.pin_prefix("m/rev1/", False) == (3, 3_000)
    entry = store.peek((0, "m/rev1/0"))
    assert entry is not None and not pb.TensorMeta.FromString(entry.meta).pinned
    assert store.stats().pinned_bytes == 0


def test_unpinned_entries_become_evictable_again():
    store = Store(5_000, pinned_capacity=5_000)
    put(store, "w", 1_000, pinned=True)
    store.pin_prefix("w", False)
    for i in range(10):
        put(store, f"a{i}", 1_000)
    assert not held(store, "w")


def test_client_pins_puts_and_namespaces_on_the_fake_cluster():
    with FakeCluster(["a", "b"], capacity=4 * 2**20) as cluster, cluster.connect() as c:
        big = np.arange(300_000, dtype=np.float32)  # 1.2 MB: striped below
        c.put("m/rev1/w", big, pin=True)
        pinned = sum(s.pinned_bytes for s in c.stats())
        assert pinned > big.nbytes  # the manifest and every stripe
        c.put_many({"m/rev2/a": np.ones(10), "m/rev2/b": np.zeros(10)})
        r = c.pin("m/rev2/")
        assert r.entries == 2 and r.bytes > 0
        assert sum(s.pinned for s in c.stats()) > 2
        with pytest.raises(CapacityExceeded):
            c.put("huge", np.zeros(2 * 2**20, np.uint8), pin=True)  # > each node's 2 MiB quota
        assert c.unpin("m/").entries >= 3
        assert sum(s.pinned_bytes for s in c.stats()) == 0
        with pytest.raises(InvalidArgument, match="prefix"):
            c.pin("bad\x00prefix")
        np.testing.assert_array_equal(c.get("m/rev1/w"), big)


def test_a_pinned_entry_handed_to_a_new_owner_stays_pinned():
    with FakeCluster(["a", "b", "c"], capacity=8 * 2**20) as cluster, cluster.connect() as c:
        keys = [f"w{i}" for i in range(30)]
        c.put_many({k: np.full(100, i, np.float32) for i, k in enumerate(keys)}, pin=True)
        before = sum(s.pinned for s in c.stats())
        cluster.remove_node("a")  # drains its entries to their new owners
        cluster.settle()
        after = c.stats()
        assert sum(s.pinned for s in after) == before == 30
        assert sum(s.pins_dropped for s in after) == 0
        for i, k in enumerate(keys):
            np.testing.assert_array_equal(c.get(k), np.full(100, i, np.float32))
