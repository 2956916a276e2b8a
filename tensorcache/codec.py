"""Tensor codec: numpy arrays ⇄ self-describing metadata plus a flat byte view.

Tensors travel as their raw memory in C or Fortran order with dtype, shape,
order, nbytes and a CRC32C next to the bytes; both ends check them. Encoding
never copies a C- or F-contiguous array (it hands out a byte *view*);
decoding allocates the destination once and callers write received chunks
straight into its byte view.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

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
    are copied once into C order.
    """
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


def check_layout(dtype: str, shape: tuple[int, ...] | list[int], order: str, nbytes: int) -> Layout:
    """Validate received metadata; raise InvalidArgument naming the field."""
    return _check_layout(dtype, tuple(shape), order, nbytes)


@functools.lru_cache(maxsize=4096)  # hot path of small gets; layouts repeat a lot
def _check_layout(dtype: str, shape: tuple[int, ...], order: str, nbytes: int) -> Layout:
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
    return Layout(dtype, tuple(int(d) for d in shape), order, int(nbytes))


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
    if not isinstance(out, np.ndarray):
        raise InvalidArgument(f"out must be a numpy.ndarray, got {type(out).__name__}")
    if out.dtype.str != layout.dtype or tuple(out.shape) != layout.shape:
        raise InvalidArgument(
            f"out is {out.dtype.str} {tuple(out.shape)}, the stored tensor is "
            f"{layout.dtype} {layout.shape}"
        )
    contiguous = out.flags.c_contiguous if layout.order == "C" else out.flags.f_contiguous
    if not contiguous or not out.flags.writeable:
        raise InvalidArgument(f"out must be writable and {layout.order}-contiguous")
    return _byte_view(out, layout.order)
