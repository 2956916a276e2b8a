"""Near-cache, strict mode: a hit is served only if the owner still has its version."""

from __future__ import annotations

import numpy as np
import pytest

import tensorcache

pytestmark = pytest.mark.integration

MIB = 1024 * 1024


def test_hits_are_local_and_revalidated(cluster, prefix):
    key = prefix + "w"
    v1 = np.arange(2 * MIB, dtype=np.float32)
    with (
        tensorcache.connect(cluster.router_address, near_cache="64MiB") as reader,
        tensorcache.connect(cluster.router_address) as writer,
    ):
        writer.put(key, v1)
        np.testing.assert_array_equal(reader.get(key), v1)  # fills the near-cache
        got = reader.get(key)
        np.testing.assert_array_equal(got, v1)
        assert reader.metrics()["near_hits"] == 1
        got[:] = -1  # a caller's result is its own
        np.testing.assert_array_equal(reader.get(key), v1)

        v2 = v1 + 1
        writer.put(key, v2)  # another worker's put: the next get must see it
        np.testing.assert_array_equal(reader.get(key), v2)
        assert reader.metrics()["near_stale"] == 1

        writer.delete(key)
        assert reader.get(key) is None

        out = np.empty_like(v1)
        writer.put(key, v1)
        reader.get(key)
        assert reader.get(key, out=out) is out
        np.testing.assert_array_equal(out, v1)
        assert reader.get(key, min_version=writer.version(key) + 1) is None


def test_budget_holds(cluster, prefix):
    with tensorcache.connect(cluster.router_address, near_cache="3MiB") as c:
        for i in range(8):
            c.put(f"{prefix}{i}", np.full(MIB, i, np.uint8))
            c.get(f"{prefix}{i}")
            assert c.metrics()["near_bytes"] <= 3 * MIB
        np.testing.assert_array_equal(c.get(f"{prefix}7"), np.full(MIB, 7, np.uint8))
        assert c.metrics()["near_hits"] >= 1


# ------------------------------------------------------------------ watch mode
def _node_hits(client) -> int:
    return sum(s.hits for s in client.stats())


def test_watch_mode_hits_make_no_call_and_events_drop_stale_copies(cluster, prefix):
    from .helpers import poll

    key = prefix + "w"
    v1 = np.arange(64 * 1024, dtype=np.float32)
    with (
        tensorcache.connect(
            cluster.router_address, near_cache="64MiB", near_cache_mode="watch"
        ) as reader,
        tensorcache.connect(cluster.router_address) as writer,
    ):
        poll(lambda: reader.metrics().get("watch_live") == 1, what="event stream live")
        writer.put(key, v1)
        np.testing.assert_array_equal(reader.get(key), v1)  # fills the near-cache
        hits = _node_hits(writer)
        for _ in range(5):
            np.testing.assert_array_equal(reader.get(key), v1)
        assert reader.metrics()["near_hits"] == 5
        assert _node_hits(writer) == hits  # served without asking the owner

        v2 = v1 + 1
        writer.put(key, v2)  # pushed to the reader: its copy is dropped
        poll(lambda: np.array_equal(reader.get(key), v2), timeout=10, what="the reader sees v2")
        assert reader.metrics()["near_dropped_by_events"] >= 1

        writer.invalidate(prefix)
        poll(lambda: reader.get(key) is None, timeout=10, what="the invalidation reaches it")

        writer.put(key, v1)
        np.testing.assert_array_equal(reader.get(key), v1)
        writer.delete(key)
        poll(lambda: reader.get(key) is None, timeout=10, what="the delete reaches it")
