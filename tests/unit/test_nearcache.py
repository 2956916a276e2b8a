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
