"""The near-cache structure: LRU order, strict byte budget, private copies."""

from __future__ import annotations

import numpy as np
import pytest

from tensorcache.client.nearcache import NearCache

pytestmark = pytest.mark.unit


def test_budget_is_strict_and_lru_goes_first():
    nc = NearCache(3000)
    for i in range(3):
        nc.store(f"k{i}", np.zeros(1000, np.uint8), i + 1)
    assert nc.lookup("k0") is not None  # k0 becomes the youngest
    nc.store("k3", np.zeros(1000, np.uint8), 9)
    assert nc.bytes_used <= 3000
    assert nc.lookup("k1") is None  # the least recently used went
    assert {k for k in ("k0", "k2", "k3") if nc.lookup(k)} == {"k0", "k2", "k3"}


def test_too_big_is_not_kept_and_replaces_nothing():
    nc = NearCache(100)
    nc.store("a", np.zeros(50, np.uint8), 1)
    nc.store("a", np.zeros(500, np.uint8), 2)  # a newer value that does not fit
    assert nc.lookup("a") is None  # the old version is not served either
    assert nc.bytes_used == 0


def test_stored_copy_is_private():
    nc = NearCache(1 << 20)
    a = np.arange(10)
    nc.store("a", a, 7)
    a[:] = -1
    near = nc.lookup("a")
    assert near is not None and near.version == 7
    np.testing.assert_array_equal(near.array, np.arange(10))


def test_drop_and_negative_capacity():
    nc = NearCache(1000)
    nc.store("a", np.zeros(10, np.uint8), 1)
    nc.drop("a")
    nc.drop("missing")
    assert nc.lookup("a") is None and nc.bytes_used == 0
    with pytest.raises(ValueError, match="capacity"):
        NearCache(-1)


def test_a_fill_older_than_an_event_seen_meanwhile_is_refused():
    near = NearCache(1 << 20)
    seq = near.seq
    near.key_event("k", 5)  # an event lands while a get of version 4 is in flight
    near.store("k", np.zeros(4), 4, seq)
    assert near.lookup("k") is None  # the stale fill is refused
    near.store("k", np.zeros(4), 5, near.seq)
    assert near.lookup("k") is not None
    near.clear()
    assert near.lookup("k") is None


def test_prefix_drop_and_deletes_outrank_copies():
    near = NearCache(1 << 20)
    near.store("a/1", np.zeros(4), 3)
    near.store("b/1", np.zeros(4), 3)
    assert near.drop_prefix("a/") == 1
    assert near.lookup("a/1") is None and near.lookup("b/1") is not None
    seq = near.seq
    near.key_event("b/1", 0)  # deleted
    assert near.lookup("b/1") is None
    near.store("b/1", np.zeros(4), 99, seq)  # fetched before the delete: refused
    assert near.lookup("b/1") is None
    near.key_event("c", 7)
    near.store("c", np.zeros(4), 7, seq)  # the event of this very version: kept
    assert near.lookup("c") is not None
