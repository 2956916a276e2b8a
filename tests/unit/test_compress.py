"""Client-side compression: codecs, shuffle, framing, and the client around them.

The codec functions are tested on their own, then through the real client
against the in-memory cluster (tensorcache.testing): puts with a codec or a
namespace default come back exactly, into ``out=`` too, striped or not, and
the nodes hold (and charge) the compressed bytes.
"""

from __future__ import annotations

import numpy as np
import pytest

from tensorcache.client import compress
from tensorcache.client.config import ClientConfig
from tensorcache.errors import DataCorruption, InvalidArgument
from tensorcache.testing import FakeCluster

pytest.importorskip("blosc2")
pytestmark = pytest.mark.unit

rng = np.random.default_rng(7)
WEIGHTS = (rng.standard_normal((256, 512)) * 0.02).astype(np.float16)  # like an init
QUANT = rng.integers(-8, 8, (512, 512), dtype=np.int8)
SPARSE = np.where(rng.random((512, 256)) < 0.05, rng.standard_normal((512, 256)), 0).astype(
    np.float32
)
SAMPLES = {
    "fp16": WEIGHTS,
    "int8": QUANT,
    "sparse": SPARSE,
    "fortran": np.asfortranarray(np.arange(60_000, dtype=np.int64).reshape(200, 300)),
    "bool": rng.random(100_000) < 0.1,
    "complex": (np.arange(5000) * (1 + 1j)).astype(np.complex64),
    "0-d": np.array(3.5),
    "unicode": np.array(["ab", "cd"] * 2000),
}


@pytest.mark.parametrize("name", ["lz4", "zstd"])
@pytest.mark.parametrize("kind", sorted(SAMPLES))
def test_pack_and_unpack_round_trip_exactly(name, kind):
    value = SAMPLES[kind]
    got = compress.pack(value, name)
    if got is None:  # no gain: stored as it is
        # Tiny; or no repeated byte strings for LZ4 to find (random fp16
        # mantissas, random 4-bit ints): only zstd's entropy coder gains there.
        assert kind == "0-d" or (name, kind) in {("lz4", "fp16"), ("lz4", "int8")}
        return
    payload, info = got
    assert payload.nbytes < value.nbytes and payload.dtype == np.uint8
    back = compress.unpack(info, payload)
    assert back.dtype == value.dtype and back.shape == value.shape
    assert back.tobytes(order="A") == value.tobytes(order="A")
    assert back.flags.c_contiguous == value.flags.c_contiguous  # the stored order comes back
    out = np.empty_like(value)
    assert compress.unpack(info, payload, out) is out
    assert np.array_equal(out, value)


def test_shuffle_is_used_for_numbers_only():
    assert compress.pack(WEIGHTS, "zstd")[1].shuffle
    assert not compress.pack(SAMPLES["unicode"].astype("S2"), "zstd")[1].shuffle
    assert not compress.pack(QUANT, "zstd")[1].shuffle  # 1-byte items: nothing to shuffle


def test_incompressible_data_is_stored_as_it_is():
    noise = rng.integers(0, 256, 1 << 16, dtype=np.uint8)
    assert compress.pack(noise, "zstd") is None
    assert compress.pack(WEIGHTS, "none") is None


def test_large_tensors_are_framed_in_chunks(monkeypatch):
    monkeypatch.setattr(compress, "BLOCK", 4096)
    value = np.arange(100_000, dtype=np.float32)
    payload, info = compress.pack(value, "lz4")
    assert np.array_equal(compress.unpack(info, payload), value)
    with pytest.raises(DataCorruption):
        compress.unpack(info, payload[:-7])  # a chunk cut short
    bad = payload.copy()
    bad[60:80] = 0xEE  # a damaged chunk header
    with pytest.raises(DataCorruption):
        compress.unpack(info, bad)


def test_codec_names_and_defaults_are_checked():
    with pytest.raises(InvalidArgument, match="compression"):
        compress.check_codec("gzip")
    with pytest.raises(InvalidArgument, match="kv/"):
        ClientConfig(compression={"kv/": "brotli"})
    assert compress.choose("kv/a/b", None, {"kv/": "lz4", "kv/a/": "zstd", "": "none"}) == "zstd"
    assert compress.choose("w/x", None, {"kv/": "lz4"}) == "none"
    assert compress.choose("kv/x", "none", {"kv/": "lz4"}) == "none"  # the put's own wins


# -- through the client ------------------------------------------------------------------


def stored_bytes(cluster: FakeCluster) -> int:
    return sum(cluster.node(m.name).stat().bytes_used for m in cluster.ring.members)


@pytest.mark.parametrize("name", ["lz4", "zstd"])
def test_a_compressed_put_comes_back_exactly_and_costs_less(name):
    with FakeCluster(["a", "b"]) as plain_cluster, FakeCluster(["a", "b"]) as packed_cluster:
        plain, packed = plain_cluster.connect(), packed_cluster.connect()
        plain.put("w", SPARSE)
        packed.put("w", SPARSE, compression=name)
        got = packed.get("w")
        assert got.dtype == SPARSE.dtype and np.array_equal(got, SPARSE)
        out = np.zeros_like(SPARSE)
        assert packed.get("w", out=out) is out and np.array_equal(out, SPARSE)
        # The nodes hold and charge the compressed bytes.
        assert stored_bytes(packed_cluster) < stored_bytes(plain_cluster) / 3
        assert packed.get_many(["w", "none"])["w"].tobytes() == SPARSE.tobytes()


def test_striped_compressed_tensors_and_replicas():
    with FakeCluster(["a", "b", "c"], replicas=2) as cluster:
        c = cluster.connect(stripe_size="16KiB")
        value = np.tile(np.arange(4096, dtype=np.float32), 64)  # 1 MiB, compresses well
        big = (rng.standard_normal(200_000) * 0.1).astype(np.float16)  # stripes even packed
        c.put_many({"tile": value, "big": big}, compression="zstd")
        assert np.array_equal(c.get("tile"), value)
        out = np.empty_like(big)
        assert c.get("big", out=out) is out and np.array_equal(out, big)
        cluster.kill("a")  # failover to a replica: it holds the same packed entry
        assert np.array_equal(c.get("big"), big)


def test_namespace_defaults_apply_by_prefix():
    with FakeCluster(["a"]) as cluster:
        c = cluster.connect(compression={"kv/": "lz4"})
        c.put("kv/block", SPARSE)
        c.put("w/layer", SPARSE)
        with_kv = cluster.node("a").stat().bytes_used
        assert with_kv < 1.5 * SPARSE.nbytes  # one of the two is packed
        c.put("w/layer2", SPARSE, compression="zstd")  # explicit, outside the namespace
        assert cluster.node("a").stat().bytes_used < with_kv + SPARSE.nbytes / 2
        for key in ("kv/block", "w/layer", "w/layer2"):
            assert np.array_equal(c.get(key), SPARSE)
        # A reader with no defaults of its own reads them all the same.
        other = cluster.connect()
        assert np.array_equal(other.get("kv/block"), SPARSE)


def test_bad_compression_arguments_leave_nothing_behind():
    with FakeCluster(["a"]) as cluster:
        c = cluster.connect()
        with pytest.raises(InvalidArgument, match="compression"):
            c.put("k", WEIGHTS, compression="snappy")
        with pytest.raises(InvalidArgument, match="numpy"):
            c.put("k", [1, 2, 3], compression="lz4")  # type: ignore[arg-type]
        assert c.get("k") is None
