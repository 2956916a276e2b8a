"""Tensor codec: numpy arrays ⇄ self-describing metadata plus a flat byte view.

Tensors travel as their raw memory in C or Fortran order with dtype, shape,
order, nbytes and a CRC32C next to the bytes; both ends check them. Encoding
never copies a C- or F-contiguous array (it hands out a byte *view*);
decoding allocates the destination once and callers write received chunks
straight into its byte view.

Torch tensors (client/torchio.py) travel the same way: ``Layout.logical``
names the torch dtype (``TORCH_DTYPES``) and ``dtype`` its storage form, the
numpy dtype with the same bytes. Where numpy has an equal dtype (float32,
int64, bool, complex64, ...) the storage form *is* that dtype, so a numpy
reader gets exactly the values; where it has none (bfloat16, the float8
family, complex32, float4 pairs) the storage form is unsigned raw bits of the
same width, and a numpy reader gets them only when it asks for raw bits
(client/present.py): never silently as numbers. This module knows the names
only; it never imports torch.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import crc32c as _crc32c
import numpy as np

from tensorcache.errors import InvalidArgument

MAX_DIMS = 64
MAX_DTYPE_CHARS = 32
_MAX_DIM = int(np.iinfo(np.intp).max)


@dataclass(frozen=True, slots=True)
class Layout:
    """What a reader needs to rebuild a tensor from its bytes."""

    dtype: str
    shape: tuple[int, ...]
    order: str
    nbytes: int
    logical: str = ""  # torch dtype name when written from torch (TORCH_DTYPES), else ""


# torch dtype name -> (storage numpy dtype, whether that numpy dtype holds the
# same values). Little-endian storage: torch runs on little-endian hosts only.
# The sub-byte integer shells (int1..int7, uint1..uint7), bits*, and
# quantized dtypes are not here: torch gives them no stable element layout.
TORCH_DTYPES: dict[str, tuple[str, bool]] = {
    "torch.bool": ("|b1", True),
    "torch.uint8": ("|u1", True),
    "torch.int8": ("|i1", True),
    "torch.int16": ("<i2", True),
    "torch.uint16": ("<u2", True),
    "torch.int32": ("<i4", True),
    "torch.uint32": ("<u4", True),
    "torch.int64": ("<i8", True),
    "torch.uint64": ("<u8", True),
    "torch.float16": ("<f2", True),
    "torch.float32": ("<f4", True),
    "torch.float64": ("<f8", True),
    "torch.complex64": ("<c8", True),
    "torch.complex128": ("<c16", True),
    "torch.bfloat16": ("<u2", False),
    "torch.complex32": ("<u4", False),
    "torch.float8_e4m3fn": ("|u1", False),
    "torch.float8_e4m3fnuz": ("|u1", False),
    "torch.float8_e5m2": ("|u1", False),
    "torch.float8_e5m2fnuz": ("|u1", False),
    "torch.float8_e8m0fnu": ("|u1", False),
    "torch.float4_e2m1fn_x2": ("|u1", False),
}
# A numpy-written entry read as torch: the torch dtype with the same values.
NUMPY_TO_TORCH: dict[str, str] = {
    storage: name for name, (storage, exact) in TORCH_DTYPES.items() if exact
}


def torch_dtype_of(layout: Layout) -> str | None:
    """The torch dtype a torch reader gets for ``layout`` (None: torch has none)."""
    return layout.logical or NUMPY_TO_TORCH.get(layout.dtype)


def numpy_exact(layout: Layout) -> bool:
    """Whether the stored numpy dtype holds the tensor's values (not raw bits)."""
    return not layout.logical or TORCH_DTYPES[layout.logical][1]


def describe(layout: Layout) -> str:
    """``layout``'s dtype as a user wrote it: the torch name, else the numpy one."""
    return layout.logical or layout.dtype


@dataclass(frozen=True, slots=True)
class Encoded:
    """A value already described (client/torchio.py): its layout and flat byte view."""

    layout: Layout
    view: np.ndarray


class OutView(NamedTuple):  # a tuple: made on every get into a torch out, cheaply
    """A caller's non-numpy ``out`` (a torch tensor) seen as its storage array.

    ``logical`` is the torch dtype it holds: a get into it checks that against
    the stored tensor's (``torch_dtype_of``), not only the storage dtype, so a
    bfloat16 ``out`` never receives an int16 or float16 entry's bytes.
    """

    array: np.ndarray
    logical: str


def crc32c(data: object, value: int = 0) -> int:
    """CRC32C of a bytes-like object (hardware-accelerated), chainable."""
    return int(_crc32c.crc32c(data, value))  # type: ignore[arg-type]  # any buffer, ndarray too


def _check_dtype(dtype: np.dtype, field: str = "dtype") -> None:
    if dtype.hasobject:
        raise InvalidArgument(
            f"{field} {dtype} holds Python objects, which have no stable byte form; "
            "convert to a numeric, bool, bytes (S) or unicode (U) dtype"
        )
    if dtype.names is not None or dtype.subdtype is not None:
        raise InvalidArgument(f"{field} {dtype} is structured; store each field as its own tensor")


def _byte_view(arr: np.ndarray, order: str) -> np.ndarray:
    """A flat uint8 view of a contiguous array's memory (no copy)."""
    flat = arr.T if order == "F" else arr
    return flat.reshape(-1).view(np.uint8)


def encode(array: object) -> tuple[Layout, np.ndarray]:
    """Describe ``array`` and return a flat uint8 view of its bytes.

    C- and F-contiguous arrays are viewed, not copied; other strided views
    are copied once into C order. An ``Encoded`` value is returned as it is.
    """
    if isinstance(array, Encoded):
        return array.layout, array.view
    if not isinstance(array, np.ndarray):
        raise InvalidArgument(
            f"value must be a numpy.ndarray, got {type(array).__module__}.{type(array).__name__}"
        )
    _check_dtype(array.dtype, "value dtype")
    if array.flags.c_contiguous:
        order = "C"
    elif array.flags.f_contiguous:
        order = "F"
    else:
        array = np.ascontiguousarray(array)
        order = "C"
    layout = Layout(array.dtype.str, tuple(int(d) for d in array.shape), order, int(array.nbytes))
    return layout, _byte_view(array, order)


def check_logical(logical: str, dtype: str) -> None:
    """``logical`` is a known torch dtype stored as numpy ``dtype``; InvalidArgument if not."""
    known = TORCH_DTYPES.get(logical)
    if known is None:
        raise InvalidArgument(
            f"logical_dtype {logical[:40]!r} is not a torch dtype this version knows"
        )
    if known[0] != dtype:
        raise InvalidArgument(
            f"logical_dtype {logical} is stored as {known[0]}, but dtype is {dtype!r}"
        )


def check_layout(
    dtype: str, shape: tuple[int, ...] | list[int], order: str, nbytes: int, logical: str = ""
) -> Layout:
    """Validate received metadata; raise InvalidArgument naming the field."""
    return _check_layout(dtype, tuple(shape), order, nbytes, logical)


@functools.lru_cache(maxsize=4096)  # hot path of small gets; layouts repeat a lot
def _check_layout(
    dtype: str, shape: tuple[int, ...], order: str, nbytes: int, logical: str
) -> Layout:
    if logical:
        check_logical(logical, dtype)
    if not dtype or len(dtype) > MAX_DTYPE_CHARS:
        raise InvalidArgument(f"dtype {dtype!r} is empty or longer than {MAX_DTYPE_CHARS} chars")
    try:
        dt = np.dtype(dtype)
    # Any exception, not only TypeError/ValueError: numpy parses comma strings
    # with ast, so "," raises SyntaxError (found by tests/unit/test_wire_properties.py).
    except Exception as exc:
        raise InvalidArgument(f"dtype {dtype!r} is not a numpy dtype: {exc}") from exc
    if dt.str != dtype:
        raise InvalidArgument(
            f"dtype {dtype!r} is not in canonical form (numpy dtype.str gives {dt.str!r})"
        )
    _check_dtype(dt)
    if len(shape) > MAX_DIMS:
        raise InvalidArgument(f"shape has {len(shape)} dims, more than {MAX_DIMS}")
    for i, d in enumerate(shape):
        if not 0 <= d <= _MAX_DIM:
            raise InvalidArgument(f"shape[{i}] = {d} is outside 0..{_MAX_DIM}")
    if order not in ("C", "F"):
        raise InvalidArgument(f"order must be 'C' or 'F', got {order!r}")
    expected = dt.itemsize * math.prod(shape)
    if expected > _MAX_DIM:
        raise InvalidArgument(f"nbytes {expected} is more than this platform can address")
    if expected != nbytes:
        raise InvalidArgument(
            f"nbytes {nbytes} does not match dtype {dtype} x shape {tuple(shape)} = {expected}"
        )
    return Layout(dtype, tuple(int(d) for d in shape), order, int(nbytes), logical)


def allocate(layout: Layout) -> tuple[np.ndarray, np.ndarray]:
    """Allocate the destination array for ``layout`` and its flat uint8 byte view."""
    arr = np.empty(layout.shape, dtype=_np_dtype(layout.dtype), order=layout.order)  # type: ignore[call-overload]  # order: "C"|"F", checked
    if arr.ndim <= 1:  # the common small case: skip the reshape
        return arr, arr.view(np.uint8) if arr.ndim else arr.reshape(-1).view(np.uint8)
    return arr, _byte_view(arr, layout.order)


@functools.lru_cache(maxsize=256)
def _np_dtype(s: str) -> np.dtype:
    return np.dtype(s)


def view_for(out: object, layout: Layout) -> np.ndarray:
    """The flat byte view of a caller's ``out`` array, if it can hold ``layout`` exactly."""
    if isinstance(out, OutView):
        have = torch_dtype_of(layout)
        if out.logical != have or tuple(out.array.shape) != layout.shape:
            raise InvalidArgument(
                f"out is {out.logical} {tuple(out.array.shape)}, the stored tensor is "
                f"{have or layout.dtype + ' (no torch dtype)'} {layout.shape}"
            )
        return _byte_view(out.array, "C") if layout.order == "C" else view_for(out.array, layout)
    if not isinstance(out, np.ndarray):
        raise InvalidArgument(f"out must be a numpy.ndarray, got {type(out).__name__}")
    if out.dtype.str != layout.dtype or tuple(out.shape) != layout.shape:
        raise InvalidArgument(
            f"out is {out.dtype.str} {tuple(out.shape)}, the stored tensor is "
            f"{describe(layout)} {layout.shape}"
        )
    if not numpy_exact(layout):
        raise InvalidArgument(
            f"out is a numpy array, the stored tensor is {layout.logical}, which numpy has no "
            "dtype for; pass a torch tensor as out"
        )
    contiguous = out.flags.c_contiguous if layout.order == "C" else out.flags.f_contiguous
    if not contiguous or not out.flags.writeable:
        raise InvalidArgument(f"out must be writable and {layout.order}-contiguous")
    return _byte_view(out, layout.order)
