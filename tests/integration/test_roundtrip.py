"""Exact round trips through real nodes: every dtype, shape and memory layout."""

from __future__ import annotations

import sys

import numpy as np
import pytest

import tensorcache
from tensorcache.apps.cluster import LocalCluster

from .helpers import TRANSPORTS, assert_same, sample, total

pytestmark = pytest.mark.integration

DTYPES = [
    "bool",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "float16",
    "float32",
    "float64",
    "complex64",
    "complex128",
    "datetime64[ns]",
    "datetime64[D]",
    "timedelta64[us]",
    "S5",
    "<U3",
    ">f4",
]
SHAPES = [(), (0,), (3, 0, 2), (7,), (4, 5), (2, 3, 4)]
LAYOUTS = ["C", "F", "strided", "reversed", "unaligned"]


def arrange(dtype: str, shape: tuple[int, ...], layout: str, seed: int) -> np.ndarray:
    """A sample in the requested memory layout (checking the layout really is that)."""
    if layout == "C":
        return sample(dtype, shape, seed)
    if layout == "F":
        a = np.asfortranarray(sample(dtype, shape, seed))
        assert a.flags.f_contiguous
        return a
    if layout == "unaligned":  # contiguous, but one byte off any alignment
        a = sample(dtype, shape, seed)
        raw = np.empty(a.nbytes + 1, dtype=np.uint8)[1:]
        u = raw.view(a.dtype).reshape(shape)
        u[...] = a
        assert a.dtype.alignment == 1 or a.size == 0 or not u.flags.aligned
        return u
    if not shape:  # a 0-d array has no strided view; it is its own contiguous self
        return sample(dtype, shape, seed)
    if layout == "reversed":  # negative strides
        a = sample(dtype, shape, seed)[::-1]
        assert a.size < 2 or shape[0] < 2 or not a.flags.c_contiguous
        return a
    base = sample(dtype, (2 * shape[0], *shape[1:]), seed)
    a = base[::2]
    assert a.shape == shape and a.base is not None
    if a.size > 1 and shape[0] > 1:
        assert not a.flags.c_contiguous and not a.flags.f_contiguous
    return a


def check_layout_kept(got: np.ndarray, want: np.ndarray) -> None:
    # The order travels with the bytes: a Fortran tensor comes back Fortran.
    if want.ndim > 1 and want.size > 1 and want.flags.f_contiguous and not want.flags.c_contiguous:
        assert got.flags.f_contiguous


@pytest.fixture
def client(cluster: LocalCluster, transport):
    """This module's client: every round trip runs over both bulk transports."""
    with tensorcache.connect(cluster.router_address, **transport) as c:
        yield c


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_every_shape(client, prefix, dtype, layout):
    values = {
        f"{prefix}{i}": arrange(dtype, shape, layout, seed=i) for i, shape in enumerate(SHAPES)
    }
    for key, value in values.items():
        version = client.put(key, value)
        assert isinstance(version, int) and version > 0
        got = client.get(key)
        assert_same(got, value)
        check_layout_kept(got, value)

    # The same through the batch calls, under fresh keys.
    batch = {f"{key}/many": value for key, value in values.items()}
    versions = client.put_many(batch)
    assert set(versions) == set(batch)
    assert all(isinstance(v, int) and v > 0 for v in versions.values())
    got_many = client.get_many(list(batch))
    assert set(got_many) == set(batch)
    for key, value in batch.items():
        assert_same(got_many[key], value)
        check_layout_kept(got_many[key], value)


STRIPED = [
    ("float32", (512, 512), "F"),
    ("complex128", (300, 400), "C"),
    (">i8", (256, 520), "strided"),
    ("<U3", (100, 1000), "C"),
    ("bool", (1_000_003,), "C"),
    ("datetime64[ns]", (131_073,), "C"),  # 1 MiB + 8 bytes: a last stripe of 8 bytes
    ("float16", (64, 64, 130), "F"),
]


@pytest.fixture
def striped_client(cluster: LocalCluster, transport):
    with tensorcache.connect(cluster.router_address, stripe_size="64KiB", **transport) as c:
        yield c


@pytest.mark.parametrize(("dtype", "shape", "layout"), STRIPED)
def test_striped_round_trip(striped_client, prefix, dtype, shape, layout):
    c = striped_client
    value = arrange(dtype, shape, layout, seed=len(prefix))
    assert value.nbytes > c.stripe_size  # really striped
    shards_before = total(c.stats(), "shards")
    c.put(prefix + "one", value)
    assert total(c.stats(), "shards") > shards_before
    got = c.get(prefix + "one")
    assert_same(got, value)
    check_layout_kept(got, value)

    twin = arrange(dtype, shape, layout, seed=len(prefix) + 1)
    c.put_many({prefix + "a": value, prefix + "b": twin})
    got = c.get_many([prefix + "a", prefix + "b", prefix + "absent"])
    assert_same(got[prefix + "a"], value)
    assert_same(got[prefix + "b"], twin)
    assert got[prefix + "absent"] is None

    for key in ("one", "a", "b"):
        assert c.delete(prefix + key) is True
    assert total(c.stats(), "shards") == shards_before


BIG = [
    ("float32", (512, 1024), "C"),  # 2 MiB: one entry, big enough for co-located reads
    ("int16", (700, 600), "F"),
    (">f8", (300, 200), "strided"),
    ("complex64", (65_536,), "reversed"),
]


@pytest.mark.parametrize(("dtype", "shape", "layout"), BIG)
def test_large_single_entry_round_trip(client, transport, prefix, dtype, shape, layout):
    value = arrange(dtype, shape, layout, seed=11)
    assert 256 * 1024 <= value.nbytes <= client.stripe_size
    client.put(prefix + "big", value)
    got = client.get(prefix + "big")
    assert_same(got, value)
    check_layout_kept(got, value)
    local_reads = client.metrics().get("local_reads", 0)
    if transport == TRANSPORTS["local"] and sys.platform.startswith("linux"):
        assert local_reads > 0, "the co-located read path was never taken"
    else:
        assert local_reads == 0
    assert client.delete(prefix + "big") is True


OUT_CASES = [
    ("float32", (512, 1024), "C"),  # 2 MiB
    ("int16", (300, 700), "F"),
    (">f8", (10,), "C"),
    ("<U3", (0,), "C"),
    ("uint8", (12 * 1024 * 1024 + 3,), "C"),  # striped at the cluster's 8 MiB
]


@pytest.mark.parametrize(("dtype", "shape", "layout"), OUT_CASES)
def test_get_into_a_caller_array(client, prefix, dtype, shape, layout):
    value = arrange(dtype, shape, layout, seed=5)
    client.put(prefix + "k", value)
    out = np.empty(shape, dtype=value.dtype, order="F" if layout == "F" else "C")
    for _ in range(2):  # and again into the same array: the reuse it is for
        got = client.get(prefix + "k", out=out)
        assert got is out
        assert_same(out, value)
    assert client.get(prefix + "absent", out=out) is None
    assert client.delete(prefix + "k") is True


def test_get_into_an_unfit_array_is_refused(client, prefix):
    value = np.asfortranarray(sample("float64", (256, 200), seed=1))  # 400 KB, F order
    client.put(prefix + "k", value)
    readonly = np.empty((256, 200), dtype=np.float64, order="F")
    readonly.flags.writeable = False
    unfit = {
        "dtype": np.empty((256, 200), dtype=np.float32, order="F"),
        "shape": np.empty((200, 256), dtype=np.float64, order="F"),
        "order": np.empty((256, 200), dtype=np.float64, order="C"),
        "read-only": readonly,
        "not-an-array": [[0.0] * 200] * 256,
    }
    for name, out in unfit.items():
        with pytest.raises(tensorcache.InvalidArgument, match="out"):
            client.get(prefix + "k", out=out)
        # The refusal left the client in step with the node: plain gets still work.
        assert_same(client.get(prefix + "k"), value), name
    assert client.delete(prefix + "k") is True


def test_thousands_of_small_tensors_in_one_call(client, prefix):
    # More keys than one RPC carries (batch_keys 4096): the client splits the work.
    values = {f"{prefix}{i}": np.array([i, -i], dtype=np.int32) for i in range(5000)}
    versions = client.put_many(values)
    assert len(versions) == len(values)
    got = client.get_many([*values, prefix + "absent"])
    assert got.pop(prefix + "absent") is None
    for key, value in values.items():
        assert_same(got[key], value)
    assert client.put_many({}) == {}
    assert client.get_many([]) == {}


def test_object_dtype_is_refused_and_nothing_is_stored(client, prefix):
    bad = np.array([1, "two", None], dtype=object)
    good = np.arange(4)
    with pytest.raises(tensorcache.InvalidArgument, match="Python objects") as info:
        client.put(prefix + "obj", bad)
    assert isinstance(info.value, ValueError)
    assert "object" in str(info.value)
    assert client.get(prefix + "obj") is None

    # One bad value refuses the whole batch before anything is sent.
    with pytest.raises(tensorcache.InvalidArgument, match="Python objects"):
        client.put_many({prefix + "good": good, prefix + "obj": bad})
    assert client.get_many([prefix + "good", prefix + "obj"]) == {
        prefix + "good": None,
        prefix + "obj": None,
    }


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (np.zeros(3, dtype=[("a", "<i4"), ("b", "<f8")]), "structured"),
        ([1, 2, 3], "numpy.ndarray"),
        (b"bytes", "numpy.ndarray"),
    ],
    ids=["structured", "list", "bytes"],
)
def test_non_tensor_values_are_refused(client, prefix, value, message):
    with pytest.raises(tensorcache.InvalidArgument, match=message):
        client.put(prefix + "bad", value)
    assert client.get(prefix + "bad") is None
