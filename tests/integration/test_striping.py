"""Striping: large tensors spread over nodes; replaced and deleted stripes are freed."""

from __future__ import annotations

import math

import numpy as np
import pytest

import tensorcache

from .helpers import assert_same, lose_first_reply, total

pytestmark = pytest.mark.integration

MIB = 1024 * 1024


@pytest.fixture
def c(cluster, transport):
    with tensorcache.connect(cluster.router_address, stripe_size="1MiB", **transport) as client:
        yield client


def pattern(nbytes: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)


def test_sixteen_mib_tensor_spreads_over_nodes(c, prefix):
    key = prefix + "t"
    base = c.stats()
    first = np.random.default_rng(1).standard_normal(4 * MIB).astype(np.float32)  # 16 MiB
    v1 = c.put(key, first)

    stats = c.stats()
    grew = [s for s, b in zip(stats, base, strict=True) if s.shards > b.shards]
    assert len(grew) >= 2, f"stripes all landed on one node: {stats}"
    assert total(stats, "shards") - total(base, "shards") == 16
    assert total(stats, "keys") - total(base, "keys") == 1
    assert total(stats, "bytes_used") - total(base, "bytes_used") >= 16 * MIB
    assert_same(c.get(key), first)

    # A new put of the same key: a newer version, and the old stripes are freed.
    second = np.random.default_rng(2).standard_normal((2048, 2048)).astype(np.float32)
    v2 = c.put(key, second)
    assert v2 > v1
    assert total(c.stats(), "shards") - total(base, "shards") == 16
    assert_same(c.get(key), second)

    assert c.delete(key) is True
    after = c.stats()
    assert total(after, "shards") == total(base, "shards")
    assert total(after, "keys") == total(base, "keys")
    assert total(after, "bytes_used") == total(base, "bytes_used")
    assert c.get(key) is None
    assert c.delete(key) is False


@pytest.mark.parametrize(
    ("nbytes", "stripes"),
    [(MIB - 1, 0), (MIB, 0), (MIB + 1, 2), (3 * MIB, 3), (3 * MIB + 5, 4)],
    ids=["below", "equal", "one-byte-over", "exact-multiple", "ragged"],
)
def test_stripe_boundaries(c, prefix, nbytes, stripes):
    key = prefix + "t"
    value = pattern(nbytes, nbytes)
    base = total(c.stats(), "shards")
    c.put(key, value)
    assert total(c.stats(), "shards") - base == stripes
    assert_same(c.get(key), value)
    assert c.delete(key) is True
    assert total(c.stats(), "shards") == base


def test_versions_increase_on_every_put(c, prefix):
    for key, nbytes in ((prefix + "small", 1000), (prefix + "striped", 3 * MIB)):
        versions = [c.put(key, pattern(nbytes, i)) for i in range(5)]
        assert versions == sorted(versions) and len(set(versions)) == 5
        assert_same(c.get(key), pattern(nbytes, 4))
        assert c.delete(key) is True


def test_replacing_striped_with_small_and_back_frees_stripes(c, prefix):
    key = prefix + "t"
    base = total(c.stats(), "shards")
    c.put(key, pattern(5 * MIB, 1))
    assert total(c.stats(), "shards") - base == 5
    small = pattern(100, 2)
    c.put(key, small)
    assert total(c.stats(), "shards") == base
    assert_same(c.get(key), small)
    big = pattern(2 * MIB + 1, 3)
    c.put(key, big)
    assert total(c.stats(), "shards") - base == 3
    assert_same(c.get(key), big)
    assert c.delete(key) is True
    assert total(c.stats(), "shards") == base


def test_put_many_mixes_striped_and_small(c, prefix):
    values = {f"{prefix}{i}": pattern(n, i) for i, n in enumerate([10, 3 * MIB, 0, MIB + 7, 5])}
    base = total(c.stats(), "shards")
    versions = c.put_many(values)
    assert set(versions) == set(values)
    expected = sum(math.ceil(v.nbytes / MIB) for v in values.values() if v.nbytes > MIB)
    assert total(c.stats(), "shards") - base == expected
    got = c.get_many([*values, prefix + "absent"])
    assert got[prefix + "absent"] is None
    for key, value in values.items():
        assert_same(got[key], value)
    for key in values:
        assert c.delete(key) is True
    assert total(c.stats(), "shards") == base


def test_reader_with_other_stripe_size_reads_striped_tensor(cluster, c, prefix):
    # The manifest records the stripes: a reader's own stripe size does not matter.
    value = pattern(5 * MIB + 3, 9)
    c.put(prefix + "t", value)
    with tensorcache.connect(cluster.router_address, stripe_size="64KiB") as other:
        assert_same(other.get(prefix + "t"), value)
        assert other.delete(prefix + "t") is True


def test_manifest_whose_stripe_was_evicted_reads_as_a_miss(make_cluster, prefix):
    cl = make_cluster(1, capacity="8MiB")
    with (
        tensorcache.connect(cl.router_address, stripe_size="1MiB") as striped,
        tensorcache.connect(cl.router_address) as plain,  # 8 MiB stripes: one entry
    ):
        value = pattern(4 * MIB, 1)
        striped.put(prefix + "t", value)  # stripes first, the manifest last
        (s,) = plain.stats()
        assert (s.keys, s.shards) == (1, 4)
        # (No read here: a read would make the manifest the least recently used.)
        # 4 MiB + 64 KiB more cannot fit beside it: LRU evicts the oldest entry, stripe 0.
        filler = pattern(4 * MIB + 64 * 1024, 2)
        plain.put(prefix + "filler", filler)
        (s,) = plain.stats()
        assert s.evictions == 1
        assert (s.keys, s.shards) == (2, 3)  # the manifest outlived its first stripe
        assert striped.get(prefix + "t") is None  # a miss, never garbage or an error
        assert striped.get_many([prefix + "t"]) == {prefix + "t": None}
        assert_same(plain.get(prefix + "filler"), filler)


@pytest.mark.parametrize("replicas", [1, 2])
def test_a_manifest_written_twice_by_a_retry_keeps_its_stripes(
    make_cluster, prefix, monkeypatch, replicas
):
    """A put whose reply was lost after the node committed it, then resent.

    Found by the soak (issue #8): the node committed the manifest, the
    connection died before its reply arrived (a reset, a black hole), and
    the client resent the put, as a put is all-or-nothing. The second commit
    replaced the first, whose stripes are the *same* ones, and its reply
    named them as replaced: the client freed the stripes of the value it had
    just written, and the acknowledged put read as a miss for good. Here the
    first data-channel put of the manifest commits on the node and then
    fails as a lost reply does; the client falls back to gRPC and resends.
    """
    cl = make_cluster(3, replicas=replicas)
    lost = lose_first_reply(monkeypatch, lambda e: bool(e.meta.stripes) and not e.version)
    value = np.arange(64 * 1024, dtype=np.float32)  # 256 KiB: 4 stripes of 64 KiB
    key = f"{prefix}retried"
    with tensorcache.connect(cl.router_address, stripe_size="64KiB", local_fastpath=False) as c:
        c.put(key, value)
        assert lost == [key.encode()], "the manifest's first put did not go through the fault"
        assert c.metrics()["data_fallbacks"] >= 1
        assert_same(c.get(key), value)
    with tensorcache.connect(cl.router_address, stripe_size="64KiB") as fresh:
        assert_same(fresh.get(key), value)  # stripes still on the nodes, not only cached


def test_the_client_never_frees_the_stripes_it_just_wrote(make_cluster, prefix, monkeypatch):
    """Against a node that names a resent manifest's own stripes as replaced.

    Nodes before the fix in node/ops.py did (a rolling upgrade mixes them):
    the client keeps every stripe its own put names, whatever a reply says.
    Every reply here reports the new manifest's stripes as replaced.
    """
    from tensorcache.client import nodes

    real = nodes.apply_put_reply

    def reports_own_stripes(batch, reply, where):  # type: ignore[no-untyped-def]
        for it, res in zip(batch, reply.results, strict=True):
            res.replaced_stripes.extend(it.meta.stripes)
        real(batch, reply, where)

    monkeypatch.setattr(nodes, "apply_put_reply", reports_own_stripes)
    cl = make_cluster(3)
    value = np.arange(64 * 1024, dtype=np.float32)
    key = f"{prefix}own"
    with tensorcache.connect(cl.router_address, stripe_size="64KiB", local_fastpath=False) as c:
        c.put(key, value)
        assert c.metrics().get("stripe_free_failures", 0) == 0
    with tensorcache.connect(cl.router_address, stripe_size="64KiB") as fresh:
        assert_same(fresh.get(key), value)
