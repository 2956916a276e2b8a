"""What a get returns, numpy array or torch tensor: the one rule, in one place.

torch is optional (``pip install tensorcache[torch]``), so this module never
imports it: a value is a torch tensor only if torch is already imported
(``sys.modules``), and the torch half (client/torchio.py) is imported the
first time a call needs it.

The rule a get follows (``as_`` is its keyword argument):

* ``out=`` a torch tensor, or ``device=`` given, or ``as_="torch"``: a
  ``torch.Tensor`` (``out`` itself when given).
* ``as_="numpy"``: a ``numpy.ndarray``, for entries whose values numpy can
  hold. An entry written from torch in a dtype numpy has no equal for
  (bfloat16, float8, complex32, float4 pairs) raises ``InvalidArgument``
  naming the key and the dtype: never raw bits silently read as numbers.
* ``as_="raw"``: the stored bits as numpy, whatever the dtype (bfloat16 as
  ``uint16``, float8 as ``uint8``, complex32 as ``uint32``; the torch dtype
  is in the message of the error above and in ``TensorMeta.logical_dtype``).
* ``as_=None`` (the default): as it was written. A tensor put from torch
  comes back as a torch tensor (on the CPU: a device is asked for with
  ``device=``, whatever device it was put from), a numpy array as a numpy array, so code
  that only ever speaks one of them never sees the other. Where torch is not
  installed, a torch-written entry comes back as numpy if numpy can hold its
  values, else ``InvalidArgument`` as for ``as_="numpy"``.

Why "as written" and not "always numpy unless asked": bfloat16 entries, the
common case for weights, have no numpy form at all, and a torch worker
reading what a torch worker wrote should not have to say so on every call.
A torch reader of a numpy-written entry asks with ``as_="torch"`` (or
``device=``/``out=``) and gets the torch dtype with the same values
(``codec.NUMPY_TO_TORCH``); numpy dtypes torch lacks (datetime, bytes,
unicode, non-native byte order) raise ``InvalidArgument``.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from tensorcache import codec
from tensorcache.client.items import PutItem
from tensorcache.errors import InvalidArgument

AS_CHOICES = (None, "numpy", "torch", "raw")


def is_torch(value: object) -> bool:
    """Whether ``value`` is a torch tensor (without importing torch)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def torch_available() -> bool:
    """Whether torch can be used here (imports it: only asked for torch-written entries)."""
    if "torch" in sys.modules:
        return True
    try:
        importlib.import_module("torch")
    except ImportError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class Want:
    """What the caller of a get asked to receive (validated)."""

    as_: str | None = None
    device: str | None = None
    out: Any = None  # the caller's torch ``out``, returned as the result

    @property
    def torch(self) -> bool:
        return self.as_ == "torch" or self.device is not None or self.out is not None

    @property
    def cuda(self) -> bool:
        return self.device is not None and self.device.startswith("cuda")


PLAIN = Want()


def want(as_: str | None, device: object, out: object) -> Want:
    """Validate a get's ``as_``/``device``/``out`` (InvalidArgument naming the field)."""
    if as_ not in AS_CHOICES:
        raise InvalidArgument(f"as_ must be one of {AS_CHOICES}, got {as_!r}")
    dev: str | None = None
    if device is not None:
        dev = str(device)  # a torch.device too
        if as_ in ("numpy", "raw"):
            raise InvalidArgument(f"device={dev!r} returns torch; as_={as_!r} contradicts it")
        if not (dev == "cpu" or dev == "cuda" or dev.startswith("cuda:")):
            raise InvalidArgument(f"device must be 'cpu', 'cuda' or 'cuda:N', got {dev!r}")
    if is_torch(out):
        if as_ in ("numpy", "raw"):
            raise InvalidArgument(f"out is a torch tensor; as_={as_!r} contradicts it")
        if device is not None:
            raise InvalidArgument("pass device= or a torch out=, not both (out has a device)")
        return Want(as_, None, out)
    if out is not None and as_ == "torch":
        raise InvalidArgument("as_='torch' with a numpy out: pass a torch tensor as out")
    return Want(as_, dev, None) if (as_ is not None or dev is not None) else PLAIN


def on_cuda(t: Any) -> bool:
    """Whether a torch tensor lives on a CUDA device."""
    return bool(t.is_cuda)


def to_device(w: Want) -> bool:
    """Whether a get lands on a CUDA device (``device="cuda…"`` or a CUDA ``out``).

    Such gets take the staging pipeline of client/torchio.py (pinned host
    slots, copies on a side stream) instead of the host read path.
    """
    return w.cuda or (w.out is not None and on_cuda(w.out))


def device_get(client: Any, key: str, w: Want, min_version: int | None) -> Any:
    """``Client.get`` onto a CUDA device (``to_device(w)``): a torch tensor or None."""
    return _torchio().get_cuda(client, key, w, min_version)


def device_get_many(client: Any, keys: list[str], w: Want) -> dict[str, Any]:
    """``Client.get_many`` onto a CUDA device: key -> torch tensor or None."""
    got: dict[str, Any] = _torchio().get_many_cuda(client, keys, w)
    return got


def _torchio() -> Any:
    """client/torchio.py (imports torch): loaded on first use, then looked up cheaply.

    Always through importlib: while one thread is still importing it, a bare
    ``sys.modules`` lookup in another hands out the half-initialised module
    (AttributeError on its first use); importlib waits for the import to end.
    """
    return importlib.import_module("tensorcache.client.torchio")


def out_dest(out: Any) -> np.ndarray | codec.OutView | None:
    """The destination a get writes into for the caller's ``out``."""
    if out is None or isinstance(out, np.ndarray):
        return out
    if is_torch(out):
        view: codec.OutView = _torchio().out_view(out)
        return view
    raise InvalidArgument(
        f"out must be a numpy.ndarray or a torch.Tensor, got {type(out).__name__}"
    )


def encode_values(values: Mapping[str, Any]) -> Mapping[str, Any]:
    """``values`` with every torch tensor described for the wire (codec.Encoded)."""
    if "torch" not in sys.modules or not any(is_torch(v) for v in values.values()):
        return values
    torchio = _torchio()
    return {
        k: torchio.encode(v, f"value of {k!r}") if is_torch(v) else v for k, v in values.items()
    }


def keep_logical(
    tensors: Iterable[PutItem], packed: Mapping[str, object], encoded: Mapping[str, Any]
) -> None:
    """Record the torch dtype of tensors stored compressed (their stored bytes are uint8)."""
    if packed:
        for it in tensors:
            value = encoded.get(it.key)
            if it.key in packed and isinstance(value, codec.Encoded) and value.layout.logical:
                it.meta.logical_dtype = value.layout.logical


def present(key: str, array: np.ndarray | None, logical: str, w: Want) -> Any:
    """The value a get returns for ``array`` (the stored form) under rule ``w``."""
    if array is None:
        return None
    if w.out is not None:
        return w.out  # the get filled the caller's tensor
    exact = not logical or codec.TORCH_DTYPES[logical][1]
    if w is PLAIN and not logical:
        return array  # the hot path: numpy in, numpy out
    as_ = w.as_
    if as_ is None and not w.torch:
        as_ = "torch" if torch_available() else "numpy"
    if as_ == "raw":
        return array
    if as_ == "numpy" and not w.torch:
        if not exact:
            raise InvalidArgument(
                f"{key!r} holds a {logical} tensor (written from torch); numpy has no such "
                f"dtype: get it with as_='torch', or as_='raw' for its raw {array.dtype} bits"
            )
        return array
    return _torchio().to_torch(key, array, logical, w)
