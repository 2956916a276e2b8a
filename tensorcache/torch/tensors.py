"""Small facts about tensor values, numpy or torch, for the weights helpers.

Not a wire conversion (the client's put/get does that): these describe a
value (its dtype by torch's name, its shape and size), view its bytes for a
checksum, and turn a checkpoint's raw bytes into a value without copying.
torch is imported only when a torch value or a torch-only dtype is met.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from tensorcache.errors import InvalidArgument
from tensorcache.torch.checkpoint import DTYPES


def is_torch(value: object) -> bool:
    return type(value).__module__.startswith("torch") and hasattr(value, "dtype")


def dtype_name(value: Any) -> str:
    """The dtype by torch's name: "float32", "bfloat16", "bool", ..."""
    if is_torch(value):
        return str(value.dtype).removeprefix("torch.")
    return str(np.asarray(value).dtype.name)


def describe(value: Any) -> Any:
    from tensorcache.torch.revision import TensorRecord

    if is_torch(value):
        shape = tuple(int(d) for d in value.shape)
        return TensorRecord(dtype_name(value), shape, value.element_size() * math.prod(shape))
    a = np.asarray(value)
    return TensorRecord(dtype_name(a), tuple(a.shape), int(a.nbytes))


def raw_bytes(value: Any) -> np.ndarray:
    """The value's bytes in C order as a uint8 array (no copy when contiguous)."""
    if is_torch(value):
        import torch

        t = value.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        flat = t.contiguous().reshape(-1)
        if flat.numel() == 0:
            return np.empty(0, np.uint8)
        return np.asarray(flat.view(torch.uint8).numpy())
    a = np.ascontiguousarray(value)
    return a.reshape(-1).view(np.uint8)


def from_buffer(dtype: str, shape: tuple[int, ...], buf: memoryview) -> Any:
    """A tensor over ``buf`` (no copy): numpy when the dtype has one, else torch."""
    np_dtype, torch_name, _ = DTYPES[dtype]
    if np_dtype is not None:
        return np.frombuffer(buf, np.dtype(np_dtype)).reshape(shape)
    try:
        import torch
    except ImportError:
        raise InvalidArgument(
            f"{dtype} tensors have no numpy dtype: they need torch (pip install tensorcache[torch])"
        ) from None
    t_dtype = getattr(torch, torch_name)
    if len(buf) == 0:
        return torch.empty(shape, dtype=t_dtype)
    return torch.frombuffer(buf, dtype=t_dtype).reshape(shape)


def as_torch(value: Any, device: Any = None) -> Any:
    """``value`` as a torch tensor (numpy: shares its memory), moved to ``device`` if given."""
    import torch

    t = value if isinstance(value, torch.Tensor) else torch.from_numpy(value)
    return t if device is None else t.to(device)
