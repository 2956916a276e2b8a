"""Versions: every put returns a larger one; conditional puts; version(); min_version."""

from __future__ import annotations

import numpy as np
import pytest

import tensorcache

from .helpers import TRANSPORTS, lose_first_reply

pytestmark = pytest.mark.integration

SMALL = np.arange(100, dtype=np.float32)
BIG = np.arange(3 * 1024 * 1024, dtype=np.float32)  # 12 MiB: striped at 8 MiB


@pytest.mark.parametrize("path", sorted(TRANSPORTS))
@pytest.mark.parametrize("value", [SMALL, BIG], ids=["small", "striped"])
def test_conditional_put(cluster, prefix, path, value):
    key = prefix + "k"
    with tensorcache.connect(cluster.router_address, **TRANSPORTS[path]) as c:
        assert c.version(key) is None
        v1 = c.put(key, value, if_version=0)  # only if absent
        assert c.version(key) == v1
        with pytest.raises(tensorcache.VersionConflict, match=str(v1)):
            c.put(key, value + 1, if_version=0)
        with pytest.raises(tensorcache.VersionConflict):
            c.put(key, value + 1, if_version=v1 + 12345)
        np.testing.assert_array_equal(c.get(key), value)  # untouched by the refusals
        assert c.version(key) == v1
        v2 = c.put(key, value + 2, if_version=v1)
        assert v2 > v1
        np.testing.assert_array_equal(c.get(key), value + 2)
        shards = sum(s.shards for s in c.stats())
        assert c.delete(key)
        assert c.version(key) is None
    if value is BIG:  # refused conditional puts left no stripes behind
        assert shards == len(range(0, BIG.nbytes, 8 * 1024 * 1024))


def test_versions_increase_and_min_version(cluster, prefix):
    key = prefix + "k"
    with tensorcache.connect(cluster.router_address) as c:
        versions = [c.put(key, SMALL + i) for i in range(5)]
        assert versions == sorted(set(versions))
        assert c.get(key, min_version=versions[-1]) is not None
        assert c.get(key, min_version=versions[-1] + 1) is None  # nothing that new yet
        with pytest.raises(tensorcache.InvalidArgument, match="if_version"):
            c.put(key, SMALL, if_version=-1)


@pytest.mark.parametrize("striped", [False, True])
def test_a_conditional_put_resent_after_a_lost_reply_is_not_a_conflict(
    make_cluster, prefix, monkeypatch, striped
):
    """The node stored the put, its reply was lost, the client resent it.

    The resend found the put's own write and, as a conditional put, was
    refused: ``put(..., if_version=0)`` raised VersionConflict for a value it
    had stored (a `get_or_load` store, a KV block, a revision's manifest).
    The put's id says it is the same put: the first send's version answers.
    """
    cl = make_cluster(3)
    lost = lose_first_reply(monkeypatch, lambda e: e.HasField("if_version"))
    value = np.arange(64 * 1024 if striped else 512, dtype=np.float32)
    key = f"{prefix}cas"
    with tensorcache.connect(cl.router_address, stripe_size="64KiB", local_fastpath=False) as c:
        version = c.put(key, value, if_version=0)
        assert lost == [key.encode()], "the put did not go through the fault"
        assert c.version(key) == version  # the first send's, not a second commit
        assert np.array_equal(c.get(key), value)
        with pytest.raises(tensorcache.VersionConflict):  # a new put still conflicts
            c.put(key, value, if_version=0)
