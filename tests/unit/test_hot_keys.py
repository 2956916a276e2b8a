"""The hottest keys of a cluster (Client.hot_keys, node/hot.py) and the export format."""

from __future__ import annotations

import numpy as np
import pytest

from tensorcache.apps.warm import batches, read_keys, write_keys
from tensorcache.errors import InvalidArgument
from tensorcache.testing import FakeCluster

pytestmark = pytest.mark.unit


def test_hot_keys_are_the_most_recently_used_visible_tensors():
    with FakeCluster(["a"]) as cluster:
        c = cluster.connect(stripe_size="16KiB")
        for i in range(10):
            c.put(f"k{i}", np.full(100, i, np.int32))
        c.put("striped", np.zeros(20_000, np.float32))  # stripes are not listed, the tensor is
        for i in (3, 7, 5):
            c.get(f"k{i}")
        c.delete("k5")
        hot = c.hot_keys(3)
        assert [k for k, _ in hot] == ["k7", "k3", "striped"]
        assert dict(c.hot_keys(100))["striped"] == 80_000  # the tensor's size, not a stripe's
        assert len(c.hot_keys(100)) == 10  # 9 left of k0..k9, and the striped one
        with pytest.raises(InvalidArgument, match="limit"):
            c.hot_keys(0)


def test_hot_keys_merge_nodes_rank_by_rank_and_count_replicas_once():
    with FakeCluster(["a", "b", "c"], replicas=2) as cluster:
        c = cluster.connect()
        for i in range(30):
            c.put(f"k{i}", np.arange(i + 1))
        hot = c.hot_keys(1000)
        assert sorted(k for k, _ in hot) == sorted(f"k{i}" for i in range(30))
        firsts = {k for k, _ in hot[:3]}
        assert "k29" in firsts  # the last put is its nodes' hottest


def test_export_round_trip_and_bad_lines(tmp_path):
    path = tmp_path / "hot.jsonl"
    write_keys([("a/é", 10), ("b", 2**40)], str(path))
    assert read_keys(str(path)) == [("a/é", 10), ("b", 2**40)]
    path.write_text('{"key": "a", "nbytes": 1}\nnot json\n')
    with pytest.raises(InvalidArgument, match=":2:"):
        read_keys(str(path))
    assert list(batches([("a", 5), ("b", 5), ("c", 5)], 10)) == [["a", "b"], ["c"]]
