"""client/nearmany.py: revalidating many near-cache hits with one version call."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from tensorcache.client.nearcache import NearCache
from tensorcache.client.nearmany import current

pytestmark = pytest.mark.unit


def _cache() -> NearCache:
    near = NearCache(1 << 20)
    for i in range(5):
        near.store(f"k{i}", np.full(4, i), version=10 + i)
    return near


def test_strict_asks_once_for_every_hit_and_drops_the_stale_ones():
    near = _cache()
    asked: list[list[str]] = []
    counts: Counter[str] = Counter()

    def versions(keys: list[str]) -> dict[str, int | None]:
        asked.append(keys)
        # k1 was overwritten elsewhere, k2 deleted; the rest are current.
        return {k: {"k1": 99, "k2": None}.get(k, 10 + int(k[1:])) for k in keys}

    got = current(
        near,
        ["k0", "k1", "k2", "k3", "absent"],
        live=False,
        versions=versions,
        count=lambda name, n=1, **_: counts.update({name: n}),
    )
    assert asked == [["k0", "k1", "k2", "k3"]]  # one call, only the hits
    assert sorted(got) == ["k0", "k3"]
    assert got["k3"].version == 13 and np.array_equal(got["k3"].array, np.full(4, 3))
    assert near.lookup("k1") is None and near.lookup("k2") is None  # stale copies dropped
    assert near.lookup("k4") is not None  # not asked about: untouched
    assert counts == Counter(near_misses=1, near_stale=2, near_hits=2)


def test_watch_mode_while_live_asks_nothing():
    near = _cache()

    def versions(keys: list[str]) -> dict[str, int | None]:
        raise AssertionError("a live event stream vouches for every copy")

    got = current(near, ["k0", "k4"], live=True, versions=versions, count=lambda *a, **k: None)
    assert sorted(got) == ["k0", "k4"]


def test_no_hits_no_call():
    near = NearCache(1 << 20)

    def versions(keys: list[str]) -> dict[str, int | None]:
        raise AssertionError("nothing to revalidate")

    assert (
        current(near, ["a", "b"], live=False, versions=versions, count=lambda *a, **k: None) == {}
    )
