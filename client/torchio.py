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
full-size pageable host copy is made. Device gets skip the near-cache (it
holds host copies; a device get reads the node), and a compressed entry is
restored on the host and copied from there.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import torch

from tensorcache import codec
from tensorcache.client import staging
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


# The storable dtypes this torch has, both ways (lookups on every get: dicts).
_DTYPES: dict[str, torch.dtype] = {
    n: dt
    for n in codec.TORCH_DTYPES
    if isinstance(dt := getattr(torch, n.removeprefix("torch."), None), torch.dtype)
}
_NAMES: dict[torch.dtype, str] = {dt: n for n, dt in _DTYPES.items()}
_LITTLE = sys.byteorder == "little"


def _torch_dtype(name: str) -> torch.dtype:
    dt = _DTYPES.get(name)
    if dt is None:  # a name this torch lacks (an older torch)
        raise InvalidArgument(f"{name} is not a dtype of this torch ({torch.__version__})")
    return dt


def _check_tensor(t: torch.Tensor, field: str) -> str:
    """The tensor's dtype name, if it can be stored; InvalidArgument naming ``field``."""
    name = _NAMES.get(t.dtype)
    if name is None:
        raise InvalidArgument(
            f"{field} has dtype {t.dtype}, which has no stable byte form to store "
            f"(supported: {', '.join(sorted(codec.TORCH_DTYPES))})"
        )
    if t.layout != torch.strided or t.is_nested:
        raise InvalidArgument(f"{field} is a {t.layout} tensor; store a dense (strided) tensor")
    if t.is_meta:
        raise InvalidArgument(f"{field} is on the meta device: it has no data")
    if not _LITTLE:
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
    if not out.is_cpu:
        raise InvalidArgument(f"out is on {out.device}; a CPU get needs a CPU out")
    if not out.is_contiguous():
        raise InvalidArgument("out must be a contiguous tensor")
    if out.is_conj() or out.is_neg():
        raise InvalidArgument("out must not be a conjugate or negative view")
    return codec.OutView(_storage_array(out.detach() if out.requires_grad else out, name), name)


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
class CudaDevice:
    """The staging ring's device side (client/staging.py) on one CUDA device.

    Copies run on a stream of their own, so they overlap the host's receive
    of the next wave; each slot's reuse waits on an event recorded after the
    copies that read it. Ordering with the caller's work, on the current
    stream: copies start after what the caller already queued (``begin``:
    a destination or ``out`` may still be in use there), and the caller's
    later work sees every copy (``finish``: the current stream waits on
    ours; no host synchronization). Tensors made here are allocated on the
    copy stream and marked as used on the current stream (``record_stream``),
    so the caching allocator never hands their memory out while either
    stream may still touch it.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device=device)  # type: ignore[no-untyped-call]
        self._made: list[torch.Tensor] = []

    def begin(self) -> None:
        self.stream.wait_stream(torch.cuda.current_stream(self.device))

    def host(self, nbytes: int) -> np.ndarray:
        pinned = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=True)
        view: np.ndarray = pinned.numpy()[:nbytes]  # keeps the pinned tensor alive
        return view

    def empty(self, nbytes: int) -> torch.Tensor:
        with torch.cuda.stream(self.stream):
            t = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        self._made.append(t)
        return t

    def copy(self, src: np.ndarray, dst: torch.Tensor, offset: int) -> None:
        with torch.cuda.stream(self.stream):
            dst[offset : offset + src.nbytes].copy_(torch.from_numpy(src), non_blocking=True)

    def mark(self) -> torch.cuda.Event:
        ev = torch.cuda.Event()  # type: ignore[no-untyped-call]
        ev.record(self.stream)
        return ev

    def wait(self, token: Any) -> None:
        token.synchronize()

    def finish(self) -> None:
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(self.stream)
        for t in self._made:
            t.record_stream(current)
        self._made.clear()


def cuda_ring(client: Any, device: torch.device) -> staging.Ring:
    """The client's staging ring for ``device`` (made on first use, then reused)."""
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    rings: dict[Any, staging.Ring] = client._staging
    ring = rings.get(device)
    if ring is None:
        ring = rings.setdefault(
            device, staging.Ring(CudaDevice(device), staging.SLOTS, client.stripe_size)
        )
    return ring


def _torch_name(key: str, layout: codec.Layout) -> str:
    name = codec.torch_dtype_of(layout)
    if name is None:
        raise InvalidArgument(
            f"{key!r} holds numpy dtype {layout.dtype}, which torch has no dtype for; "
            "get it with as_='numpy'"
        )
    return name


def out_bytes(out: torch.Tensor, key: str, layout: codec.Layout) -> torch.Tensor:
    """A caller's device ``out`` as flat bytes, if it holds ``layout`` exactly."""
    name = _check_tensor(out, "out")
    have = codec.torch_dtype_of(layout)
    if name != have or tuple(out.shape) != layout.shape:
        raise InvalidArgument(
            f"out is {name} {tuple(out.shape)}, the stored tensor is "
            f"{have or layout.dtype + ' (no torch dtype)'} {layout.shape}"
        )
    if not out.is_contiguous() or layout.order != "C":
        raise InvalidArgument(f"out must be a contiguous tensor ({key!r} is stored in C order)")
    return out.reshape(-1).view(torch.uint8)


def as_tensor(key: str, flat: torch.Tensor, layout: codec.Layout) -> torch.Tensor:
    """Flat bytes on a device as the stored tensor (dtype, shape, order)."""
    t = flat.view(_torch_dtype(_torch_name(key, layout)))
    if layout.order == "F" and len(layout.shape) > 1:
        return t.reshape(layout.shape[::-1]).permute(*reversed(range(len(layout.shape))))
    return t.reshape(layout.shape)


def staged_get(
    client: Any, keys: list[str], w: Want, ring: staging.Ring, min_version: int | None = None
) -> dict[str, Any]:
    """``keys`` onto ``ring``'s device through its staging slots; key -> tensor or None."""

    def dest_for(key: str, layout: codec.Layout) -> Any:
        if w.out is not None:
            return out_bytes(w.out, key, layout)
        _torch_name(key, layout)  # refuse before any byte moves
        return ring.device.empty(layout.nbytes)

    got = staging.get_many(keys, ring, client, dest_for)
    hits = sum(s.dest is not None for s in got.values())
    client._count("gets", len(got), hits=hits, misses=len(got) - hits, staged_gets=len(got))
    out: dict[str, Any] = {}
    for k, s in got.items():
        if s.dest is None or s.layout is None:
            out[k] = None
        elif min_version is not None and s.version < min_version:
            client._count("stale_rejected")
            out[k] = None
        else:
            out[k] = w.out if w.out is not None else as_tensor(k, s.dest, s.layout)
    return out


def get_cuda(client: Any, key: str, w: Want, min_version: int | None) -> Any:
    """A get onto a CUDA device (``device=`` or a CUDA ``out``)."""
    dev = w.out.device if w.out is not None else torch.device(w.device or "cuda")
    with torch.cuda.device(dev):
        return staged_get(client, [key], w, cuda_ring(client, dev), min_version)[key]


def get_many_cuda(client: Any, keys: list[str], w: Want) -> dict[str, Any]:
    dev = torch.device(w.device or "cuda")
    with torch.cuda.device(dev):
        return staged_get(client, keys, w, cuda_ring(client, dev))
