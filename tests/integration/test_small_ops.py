"""Small operations on real processes: what one key costs, and coalesced key events.

Issue #18 made the calls on one key cheaper on both ends: the fan-out places
a single item without grouping it (client/fanout.py), a get of one key skips
the batch bookkeeping (``Client._get_one``, falling back to the batch path
for a striped tensor), control requests take a pooled data connection
without a context manager (``DataPool.control``), and a node publishes its
key events at most once per ``--events-min-gap-ms`` while commits keep
coming (node/events.py). These tests hold the behaviour fixed through that:
each one-key call is exactly one request on the data channel, with the
right answer; a striped tensor and ``out=`` still round-trip; and a burst of
puts reaches watch-mode clients (every copy dropped) in fewer Publish calls
than events.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import tensorcache
from tensorcache.apps.cluster import LocalCluster

from .helpers import assert_same, poll
from .nodecounts import counted, quiet_cluster

pytestmark = pytest.mark.integration

DATA = {"local_fastpath": False}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with quiet_cluster(tmp_path_factory.mktemp("small")) as c:
        yield c


def data(seen: dict[tuple[str, str], float]) -> dict[tuple[str, str], float]:
    """The requests clients made on the data channel (a node may also ask a
    previous owner about a key over gRPC, node to node: not ours)."""
    return {k: n for k, n in seen.items() if k[1] == "data"}


def test_each_call_on_one_key_is_one_data_channel_request(cluster, prefix):
    key = f"{prefix}k"
    value = np.arange(1024, dtype=np.float32)  # 4 KiB
    with (
        tensorcache.connect(cluster.router_address, **DATA) as c,
        tensorcache.connect(cluster.router_address, near_cache="1MiB", **DATA) as near,
    ):
        with counted(cluster) as put:
            v1 = c.put(key, value)
        with counted(cluster) as got:
            assert_same(c.get(key), value)
        with counted(cluster) as version:
            assert c.version(key) == v1
        assert_same(near.get(key), value)  # fills the near-cache
        with counted(cluster) as hit:
            assert_same(near.get(key), value)
        with counted(cluster) as overwrite:
            v2 = c.put(key, value * 2)
        assert v2 > v1
        with counted(cluster) as stale_hit:  # revalidation sees v2: re-read
            assert_same(near.get(key), value * 2)
        out = np.zeros_like(value)
        assert c.get(key, out=out) is out
        assert_same(out, value * 2)
        assert c.get(key, min_version=v2 + 1) is None  # older than asked: a miss
        with counted(cluster) as deleted:
            assert c.delete(key) is True
        assert c.get(key) is None and c.version(key) is None
        m, nm = c.metrics(), near.metrics()
    assert data(put) == {("put", "data"): 1}
    assert data(got) == {("get", "data"): 1}
    assert data(version) == {("head", "data"): 1}
    assert data(hit) == {("head", "data"): 1}  # a head-only check, no payload
    assert data(overwrite) == {("put", "data"): 1}
    assert data(stale_hit) == {("head", "data"): 1, ("get", "data"): 1}  # check, then value
    assert data(deleted) == {("delete", "data"): 1}
    assert nm["near_hits"] == 1 and nm["near_stale"] == 1
    assert m.get("data_fallbacks", 0) == 0 and nm.get("data_fallbacks", 0) == 0
    # Counted as before: 3 hits (one rejected as older than min_version), a miss.
    assert (m["gets"], m["hits"], m["misses"]) == (4, 3, 1)
    assert m["bytes_got"] == 3 * value.nbytes and m["stale_rejected"] == 1


def test_a_striped_tensor_through_the_one_key_get(cluster, prefix):
    """The one-key get meets a manifest and hands over to the batch path."""
    key = f"{prefix}big"
    value = np.random.default_rng(7).standard_normal(300_000).astype(np.float32)  # 1.2 MB
    with tensorcache.connect(cluster.router_address, stripe_size="256KiB", **DATA) as c:
        c.put(key, value)
        assert_same(c.get(key), value)
        out = np.empty_like(value)
        assert c.get(key, out=out) is out
        assert_same(out, value)
        m = c.metrics()
    assert m["hits"] == 2 and m.get("stripe_retries", 0) == 0


@pytest.fixture
def gapped(tmp_path: Path) -> Iterator[LocalCluster]:
    """One node that publishes at most one Publish per 300 ms while commits come."""
    with LocalCluster(
        1, capacity="16MiB", log_dir=tmp_path, node_args=["--events-min-gap-ms", "300"]
    ) as c:
        yield c


def test_a_burst_of_puts_reaches_watchers_in_fewer_publishes(gapped, prefix):
    keys = [f"{prefix}w{i}" for i in range(40)]
    with (
        tensorcache.connect(gapped.router_address) as writer,
        tensorcache.connect(
            gapped.router_address, near_cache="1MiB", near_cache_mode="watch"
        ) as reader,
    ):
        writer.put_many({k: np.arange(4) for k in keys})
        poll(lambda: reader.metrics().get("watch_live"), timeout=30, what="a live stream")
        reader.get_many(keys)  # cached
        for k in keys:  # a burst, one put at a time
            writer.put(k, np.arange(4) + 1)
        # Coalesced, not lost: every copy is dropped by its event.
        poll(
            lambda: reader.metrics().get("near_dropped_by_events", 0) >= len(keys),
            timeout=30,
            what="an event for every put of the burst",
        )
        for got in reader.get_many(keys).values():
            assert_same(got, np.arange(4) + 1)
    gapped.stop()  # the node logs what it published as it stops
    log = next(gapped.log_dir.glob("node-0*.log")).read_text()
    found = re.search(r"key events: (\d+) published in (\d+) calls", log)
    assert found is not None, log[-2000:]
    events, calls = int(found.group(1)), int(found.group(2))
    assert events >= 2 * len(keys)  # the put_many, then the burst
    # The put_many, the burst's first put at once, the rest after the gap: one
    # Publish per put (gap 0, as before) made 11-41 here.
    assert calls <= 6, (events, calls)
