"""Tensor codec: byte views, layouts, and exact round trips."""

from __future__ import annotations

import numpy as np
import pytest

from tensorcache.codec import MAX_DIMS, Layout, allocate, check_layout, crc32c, encode
from tensorcache.errors import InvalidArgument

pytestmark = pytest.mark.unit

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
    "S5",
    "<U3",
    ">i4",
]
SHAPES = [(), (0,), (3, 0, 2), (5,), (4, 7), (2, 3, 4)]


def sample(dtype: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """A deterministic array with distinct, awkward values (NaN, inf, negatives)."""
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    n = int(np.prod(shape))
    if dt.kind == "b":
        flat = rng.integers(0, 2, n).astype(bool)
    elif dt.kind in "iu":
        info = np.iinfo(dt)
        flat = rng.integers(info.min, info.max, n, dtype=dt.newbyteorder("="), endpoint=True)
    elif dt.kind == "f":
        flat = (rng.standard_normal(n) * 1e3).astype(dt)
        flat[::5] = np.nan
        flat[1::7] = np.inf
    elif dt.kind == "c":
        flat = (rng.standard_normal(n) + 1j * rng.standard_normal(n)).astype(dt)
        flat[::4] = complex(np.nan, 1.0)
    elif dt.kind == "M":
        flat = rng.integers(-(2**62), 2**62, n).astype(dt)
        flat[::3] = np.datetime64("NaT")
    elif dt.kind == "S":
        flat = np.array([bytes(rng.integers(0, 256, 5, dtype=np.uint8)) for _ in range(n)], dt)
    elif dt.kind == "U":
        flat = np.array(
            ["".join(chr(c) for c in rng.integers(0x20, 0x2FFF, 3)) for _ in range(n)], dt
        )
    else:  # pragma: no cover - every DTYPES entry is handled above
        raise AssertionError(dtype)
    return np.asarray(flat, dtype=dt).reshape(shape)


def same(a: np.ndarray, b: np.ndarray) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.kind in "fc":
        return bool(np.array_equal(a, b, equal_nan=True))
    if a.dtype.kind == "M":
        return bool(np.array_equal(np.isnat(a), np.isnat(b))) and bool(
            np.array_equal(a[~np.isnat(a)], b[~np.isnat(b)])
        )
    return bool(np.array_equal(a, b))


def round_trip(array: np.ndarray) -> tuple[Layout, np.ndarray]:
    layout, view = encode(array)
    wire = bytes(view)  # what would travel, in whatever chunks
    assert len(wire) == layout.nbytes
    received = check_layout(layout.dtype, list(layout.shape), layout.order, layout.nbytes)
    assert received == layout
    out, dest = allocate(received)
    assert dest.dtype == np.uint8 and dest.ndim == 1 and dest.size == layout.nbytes
    # write in uneven chunks, as a receiver would
    pos = 0
    for size in (1, 7, 64, 1 << 20):
        dest[pos : pos + size] = np.frombuffer(wire[pos : pos + size], np.uint8)
        pos += size
        if pos >= len(wire):
            break
    return layout, out


# -- round trips -----------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_c_order(dtype, shape):
    a = sample(dtype, shape)
    layout, out = round_trip(a)
    assert layout.order == "C"
    assert layout.dtype == a.dtype.str
    assert layout.shape == shape
    assert layout.nbytes == a.nbytes
    assert same(out, a)
    assert out.flags.c_contiguous


@pytest.mark.parametrize("shape", [s for s in SHAPES if len(s) >= 2], ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_fortran_order(dtype, shape):
    a = np.asfortranarray(sample(dtype, shape, seed=1))
    layout, out = round_trip(a)
    if a.size > 0 and not a.flags.c_contiguous:
        assert layout.order == "F"
        assert out.flags.f_contiguous
    assert same(out, a)


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_non_contiguous_view(dtype):
    base = sample(dtype, (8, 9), seed=2)
    a = base[::2, 1:]
    assert not a.flags.c_contiguous and not a.flags.f_contiguous
    layout, out = round_trip(a)
    assert layout.order == "C"
    assert layout.shape == (4, 8)
    assert same(out, a)


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_transposed_and_negative_strides(dtype):
    base = sample(dtype, (3, 4, 5), seed=3)
    for a in (base.transpose(1, 2, 0), base[::-1], base[:, ::-2, 1:4]):
        _, out = round_trip(a)
        assert same(out, a)


def test_big_endian_dtype_is_kept():
    a = np.arange(6, dtype=">i4").reshape(2, 3)
    layout, view = encode(a)
    assert layout.dtype == ">i4"
    assert bytes(view[:4]) == b"\x00\x00\x00\x00"
    assert bytes(view[4:8]) == b"\x00\x00\x00\x01"
    _, out = round_trip(a)
    assert out.dtype == np.dtype(">i4")
    assert same(out, a)


def test_fortran_bytes_are_in_column_major_order():
    a = np.asfortranarray(np.arange(6, dtype=np.uint8).reshape(2, 3))
    layout, view = encode(a)
    assert layout.order == "F"
    assert bytes(view) == bytes([0, 3, 1, 4, 2, 5])


def test_encoded_bytes_match_tobytes_and_checksum():
    for a in (sample("float32", (4, 7)), np.asfortranarray(sample("int16", (4, 7)))):
        layout, view = encode(a)
        expected = a.tobytes(order=layout.order)
        assert bytes(view) == expected
        assert crc32c(view) == crc32c(expected)


# -- no copies ------------------------------------------------------------------


@pytest.mark.parametrize("shape", [s for s in SHAPES if np.prod(s) > 0], ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_encode_does_not_copy_contiguous_arrays(dtype, shape):
    c = sample(dtype, shape)
    f = np.asfortranarray(c)
    for a in (c, f):
        _, view = encode(a)
        assert np.shares_memory(view, a)


def test_encode_view_writes_through():
    a = np.zeros((2, 2), dtype=np.uint8)
    _, view = encode(a)
    view[3] = 9
    assert a[1, 1] == 9


def test_encode_copies_strided_views():
    base = np.arange(20, dtype=np.int32).reshape(4, 5)
    a = base[::2, 1:]
    _, view = encode(a)
    assert not np.shares_memory(view, base)


def test_allocate_view_writes_into_the_array():
    for order in ("C", "F"):
        layout = check_layout("<u2", (2, 3), order, 12)
        arr, view = allocate(layout)
        assert np.shares_memory(arr, view)
        view[:] = np.arange(12, dtype=np.uint8)
        assert arr.tobytes(order=order) == bytes(range(12))


# -- rejected values --------------------------------------------------------------


def test_object_dtype_rejected():
    with pytest.raises(InvalidArgument, match="object"):
        encode(np.array([1, "a", None], dtype=object))


@pytest.mark.parametrize(
    "dtype",
    [np.dtype([("a", "<i4"), ("b", "<f8")]), np.dtype([("x", "<f4", (2,))])],
    ids=["record", "record-with-subarray"],
)
def test_structured_dtype_rejected(dtype):
    with pytest.raises(InvalidArgument, match="structured") as info:
        encode(np.zeros(3, dtype=dtype))
    assert str(dtype) in str(info.value)


def test_structured_dtype_with_object_field_rejected():
    with pytest.raises(InvalidArgument, match="dtype"):
        encode(np.zeros(2, dtype=[("a", "O")]))


@pytest.mark.parametrize(
    "value",
    [[1, 2, 3], (1.0,), b"bytes", 3.5, None, memoryview(b"ab")],
    ids=["list", "tuple", "bytes", "float", "none", "memoryview"],
)
def test_non_ndarray_rejected(value):
    with pytest.raises(InvalidArgument, match=r"numpy\.ndarray") as info:
        encode(value)
    assert type(value).__name__ in str(info.value)


def test_invalid_argument_is_value_error():
    with pytest.raises(ValueError):
        encode([1])


# -- check_layout ---------------------------------------------------------------


def test_check_layout_accepts_and_normalises():
    layout = check_layout("<f4", [2, 3], "F", 24)
    assert layout == Layout("<f4", (2, 3), "F", 24)
    assert isinstance(layout.shape, tuple)


@pytest.mark.parametrize(
    "dtype",
    [
        "|b1",
        "|i1",
        "<i2",
        "<i4",
        "<i8",
        "|u1",
        "<u8",
        "<f2",
        "<f4",
        "<f8",
        "<c8",
        "<c16",
        "<M8[ns]",
        "|S5",
        "<U3",
        ">i4",
        ">f8",
    ],
)
def test_check_layout_accepts_canonical_dtypes(dtype):
    itemsize = np.dtype(dtype).itemsize
    assert check_layout(dtype, (3,), "C", 3 * itemsize).dtype == dtype


@pytest.mark.parametrize(
    ("dtype", "problem"),
    [
        ("nope", "not a numpy dtype"),
        ("O", "canonical"),
        ("|O", "objects"),
        ("float32", "canonical"),
        ("f4", "canonical"),
        ("i8", "canonical"),
        ("", "empty"),
        ("<" + "f" * 40, "longer than"),
    ],
)
def test_check_layout_rejects_bad_dtype(dtype, problem):
    with pytest.raises(InvalidArgument, match=problem) as info:
        check_layout(dtype, (1,), "C", 8)
    assert str(info.value).startswith("dtype")


@pytest.mark.parametrize("order", ["X", "c", "", "A", "K"])
def test_check_layout_rejects_bad_order(order):
    with pytest.raises(InvalidArgument, match="order") as info:
        check_layout("<f4", (2,), order, 8)
    assert repr(order) in str(info.value)


@pytest.mark.parametrize(
    ("shape", "nbytes"),
    [((2, 3), 23), ((2, 3), 25), ((), 0), ((0,), 4), ((5,), 0)],
)
def test_check_layout_rejects_nbytes_mismatch(shape, nbytes):
    with pytest.raises(InvalidArgument, match="nbytes") as info:
        check_layout("<f4", shape, "C", nbytes)
    assert str(nbytes) in str(info.value)


def test_check_layout_dims_limit():
    assert check_layout("|u1", (1,) * MAX_DIMS, "C", 1).shape == (1,) * MAX_DIMS
    with pytest.raises(InvalidArgument, match="shape") as info:
        check_layout("|u1", (1,) * (MAX_DIMS + 1), "C", 1)
    assert str(MAX_DIMS + 1) in str(info.value)


def test_check_layout_zero_size_and_scalar():
    assert check_layout("<f8", (), "C", 8).shape == ()
    assert check_layout("<f8", (3, 0, 2), "F", 0).nbytes == 0


def test_check_layout_rejects_negative_dims():
    with pytest.raises(InvalidArgument, match="shape"):
        check_layout("<i4", (-1, -2), "C", 8)


def test_check_layout_rejects_dims_numpy_cannot_allocate():
    # shape is uint64 on the wire: an empty tensor could name an absurd dim.
    with pytest.raises(InvalidArgument, match=r"shape\[0\]"):
        check_layout("<i4", (2**63, 0), "C", 0)


# -- crc32c ---------------------------------------------------------------------


def test_crc32c_known_value_and_chaining():
    assert crc32c(b"123456789") == 0xE3069283  # the standard CRC-32C check value
    assert crc32c(b"") == 0
    assert crc32c(b"6789", crc32c(b"12345")) == crc32c(b"123456789")


def test_crc32c_accepts_buffers():
    data = bytes(range(256)) * 4
    assert crc32c(memoryview(data)) == crc32c(data)
    assert crc32c(np.frombuffer(data, np.uint8)) == crc32c(data)
