"""Namespace invalidation: c.invalidate(prefix) hides every older value under it."""

from __future__ import annotations

import numpy as np
import pytest

import tensorcache

pytestmark = pytest.mark.integration


def _v(i: int) -> np.ndarray:
    return np.full(1024, i, dtype=np.int32)


@pytest.mark.parametrize("replicas", [1, 2])
def test_invalidate_hides_old_values_everywhere(make_cluster, replicas):
    cluster = make_cluster(3, replicas=replicas)
    with (
        tensorcache.connect(cluster.router_address) as a,
        tensorcache.connect(cluster.router_address, near_cache="16MiB") as b,
        tensorcache.connect(cluster.router_address, stripe_size="64KiB") as big,
    ):
        for i in range(30):
            a.put(f"model/v1/{i}", _v(i))
            a.put(f"other/{i}", _v(i))
        big.put("model/v1/big", np.arange(64 * 1024, dtype=np.int32))  # striped
        for i in range(30):
            assert b.get(f"model/v1/{i}") is not None  # b's near-cache holds them
        epoch_before = a.epoch
        gen = a.invalidate("model/")
        assert gen > epoch_before
        for c in (a, b, big):
            for i in range(30):
                assert c.get(f"model/v1/{i}") is None, (c, i)
                np.testing.assert_array_equal(c.get(f"other/{i}"), _v(i))
            assert c.get("model/v1/big") is None
            assert c.version("model/v1/0") is None
        # New values under the prefix are visible again, with higher versions.
        v = a.put("model/v1/0", _v(100))
        np.testing.assert_array_equal(b.get("model/v1/0"), _v(100))
        assert a.put("model/v1/0", _v(101), if_version=v) > v
        # Conditional put: an invalidated entry counts as absent.
        a.put("model/v1/1", _v(1))
        gen2 = a.invalidate("model/v1/1")
        assert gen2 > gen
        assert a.put("model/v1/1", _v(2), if_version=0) > 0
        assert sum(s.invalidated for s in _raw_stats(cluster)) > 0


def _raw_stats(cluster):
    import grpc

    from tensorcache.grpcutil import CHANNEL_OPTIONS
    from tensorcache.proto import tensorcache_pb2 as pb

    out = []
    for proc in cluster.nodes.values():
        with grpc.insecure_channel(proc.address, options=CHANNEL_OPTIONS) as ch:
            out.append(
                ch.unary_unary(
                    "/tensorcache.v1.Node/Stat",
                    request_serializer=pb.StatRequest.SerializeToString,
                    response_deserializer=pb.NodeStats.FromString,
                )(pb.StatRequest(), timeout=10)
            )
    return out


def test_invalidate_everything_and_bad_prefixes(make_cluster):
    cluster = make_cluster(2)
    with tensorcache.connect(cluster.router_address) as c:
        c.put("x", _v(1))
        c.put("y/z", _v(2))
        c.invalidate("")
        assert c.get("x") is None and c.get("y/z") is None
        with pytest.raises(tensorcache.InvalidArgument, match="prefix"):
            c.invalidate(b"bytes")  # type: ignore[arg-type]
        with pytest.raises(tensorcache.InvalidArgument, match="prefix"):
            c.invalidate("a\x00b")
        with pytest.raises(tensorcache.InvalidArgument, match="prefix"):
            c.invalidate("p" * 1025)
        c.put("x", _v(3))  # the cluster is intact after bad calls
        np.testing.assert_array_equal(c.get("x"), _v(3))


@pytest.mark.usefixtures("etcd_binary")
def test_invalidate_with_etcd(make_cluster):
    cluster = make_cluster(3, etcd="auto", replicas=2)
    with tensorcache.connect(cluster.router_address) as c:
        for i in range(10):
            c.put(f"ns/{i}", _v(i))
        epoch = c.epoch
        gen = c.invalidate("ns/")
        assert gen > epoch  # etcd mode: the revision that recorded it
        assert all(c.get(f"ns/{i}") is None for i in range(10))
        c.put("ns/0", _v(7))
        np.testing.assert_array_equal(c.get("ns/0"), _v(7))
