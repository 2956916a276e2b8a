"""torch tensors ⇄ the stored form (imported only when torch is in use).

A tensor is stored as the numpy array over the same bytes (codec.py): its
own dtype where numpy has one, raw bits of the same width where it has none,
with the torch dtype name in ``Layout.logical``. Both directions avoid
copies on CPU: ``encode`` views a contiguous CPU tensor's memory, and
``to_torch`` wraps the array a get received (``torch.from_numpy``), so a
torch get costs what a numpy get costs.

CUDA tensors: a put synchronizes the tensor's device before copying it to
host (below: why the device, not a stream); a get with ``device="cuda..."``
or a CUDA ``out`` goes through the staging ring (client/staging.py) so no
full-size pageable host copy is made.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import torch

from tensorcache import codec
from tensorcache.client.present import Want
from tensorcache.errors import InvalidArgument

# Raw-bit storage (codec.TORCH_DTYPES entries numpy cannot hold) -> the torch
# dtype of that width to view through, and its numpy twin. Signed ones: every
# torch >= 2.1 has them (uint16 and uint32 arrived in 2.3).
_RAW: dict[str, tuple[torch.dtype, np.dtype]] = {
    "<u2": (torch.int16, np.dtype("<i2")),
    "|u1": (torch.uint8, np.dtype("|u1")),
    "<u4": (torch.int32, np.dtype("<i4")),
}


def _torch_dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype):  # a name this torch lacks (an older torch)
        raise InvalidArgument(f"{name} is not a dtype of this torch ({torch.__version__})")
    return dt


def _check_tensor(t: torch.Tensor, field: str) -> str:
    """The tensor's dtype name, if it can be stored; InvalidArgument naming ``field``."""
    name = str(t.dtype)
    if name not in codec.TORCH_DTYPES:
        raise InvalidArgument(
            f"{field} has dtype {name}, which has no stable byte form to store "
            f"(supported: {', '.join(sorted(codec.TORCH_DTYPES))})"
        )
    if t.layout != torch.strided or t.is_nested:
        raise InvalidArgument(f"{field} is a {t.layout} tensor; store a dense (strided) tensor")
    if t.device.type == "meta":
        raise InvalidArgument(f"{field} is on the meta device: it has no data")
    if sys.byteorder != "little":
        raise InvalidArgument("torch tensors are stored little-endian; this host is big-endian")
    return name


def _storage_array(t: torch.Tensor, name: str) -> np.ndarray:
    """The numpy array over a contiguous CPU tensor's bytes (no copy)."""
    storage, exact = codec.TORCH_DTYPES[name]
    if exact:
        arr: np.ndarray = t.numpy()
        return arr
    return t.view(_RAW[storage][0]).numpy().view(storage)


def to_host(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy of a CUDA tensor whose producer is unknown.

    torch does not record which stream wrote a tensor; a put may be handed
    one written on a side stream with no sync by the caller. Copying on the
    current stream would then race that write. Synchronizing the tensor's
    *device* waits for every stream on it, so the bytes copied are the ones
    the producer wrote, whichever stream it used.
    """
    torch.cuda.synchronize(t.device)
    return t.to("cpu")


def encode(t: torch.Tensor, field: str) -> codec.Encoded:
    """Describe a tensor for a put: its layout (with ``logical``) and flat byte view."""
    name = _check_tensor(t, field)
    t = t.detach()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    if t.device.type == "cuda":
        t = to_host(t)
    elif t.device.type != "cpu":
        t = t.to("cpu")  # other accelerators: their .to() synchronizes
    if not t.is_contiguous():
        t = t.contiguous()
    arr = _storage_array(t, name)
    layout = codec.Layout(arr.dtype.str, tuple(int(d) for d in t.shape), "C", int(arr.nbytes), name)
    return codec.Encoded(layout, arr.reshape(-1).view(np.uint8))


def out_view(out: torch.Tensor) -> codec.OutView:
    """A caller's CPU ``out`` tensor as the storage array a get fills."""
    name = _check_tensor(out, "out")
    if out.device.type != "cpu":
        raise InvalidArgument(f"out is on {out.device}; a CPU get needs a CPU out")
    if not out.is_contiguous():
        raise InvalidArgument("out must be a contiguous tensor")
    if out.is_conj() or out.is_neg():
        raise InvalidArgument("out must not be a conjugate or negative view")
    return codec.OutView(_storage_array(out.detach(), name), name)


def to_torch(key: str, array: np.ndarray, logical: str, w: Want) -> Any:
    """The torch tensor for a stored array (``w.out`` itself when the get filled it)."""
    if w.out is not None:
        return w.out
    name = logical or codec.NUMPY_TO_TORCH.get(array.dtype.str)
    if name is None:
        raise InvalidArgument(
            f"{key!r} holds numpy dtype {array.dtype.str}, which torch has no dtype for; "
            "get it with as_='numpy'"
        )
    raw = bool(logical) and not codec.TORCH_DTYPES[logical][1]
    if raw:
        array = array.view(_RAW[array.dtype.str][1])
    try:
        t = torch.from_numpy(array)  # shares the array's memory; F order stays strided
    except TypeError as exc:  # e.g. uint16 on a torch older than 2.3
        raise InvalidArgument(f"{key!r}: this torch cannot hold {name}: {exc}") from exc
    if raw:
        t = t.view(_torch_dtype(logical))
    if w.device is not None and w.device != "cpu":
        t = t.to(w.device)
    return t


# ---------------------------------------------------------------- CUDA gets
# (the staging ring replaces these host round trips: client/staging.py)
def get_cuda(client: Any, key: str, w: Want, min_version: int | None) -> Any:
    """A get onto a CUDA device (``device=`` or a CUDA ``out``)."""
    array, version, logical = client._get_host(key, None)
    if array is None or (min_version is not None and version < min_version):
        return None
    return _to_device(key, array, logical, w)


def get_many_cuda(client: Any, keys: list[str], w: Want) -> dict[str, Any]:
    got = client._get_many(keys, None)
    return {k: None if a is None else _to_device(k, a, lg, w) for k, (a, _, lg) in got.items()}


def _to_device(key: str, array: np.ndarray, logical: str, w: Want) -> Any:
    t = to_torch(key, array, logical, Want(w.as_, None, None))
    if w.out is not None:
        if w.out.dtype != t.dtype or tuple(w.out.shape) != tuple(t.shape):
            raise InvalidArgument(
                f"out is {w.out.dtype} {tuple(w.out.shape)}, the stored tensor is "
                f"{t.dtype} {tuple(t.shape)}"
            )
        w.out.copy_(t)
        return w.out
    return t.to(w.device)
