"""Compression of tensors in the client: byte shuffle + LZ4 or Zstandard.

Done here, before the bytes leave the worker, so it saves the network and
the nodes' memory both: a node stores the compressed bytes as an ordinary
``uint8`` entry (its byte budget charges the compressed size) and never
looks inside. The tensor's own layout (dtype, shape, order, nbytes) and the
codec travel in ``TensorMeta.compression``; a get sees it and restores the
tensor, into the caller's ``out=`` array when one is given. Checksums stay
end to end on what is stored and sent: the compressed bytes.

Codecs come from blosc2 (the ``compression`` extra): it splits the data
into blocks, applies a SIMD byte *shuffle* (byte i of every element
together: the exponent bytes of floats, the high bytes of small integers,
which are alike, end up next to each other), compresses blocks on several
threads and decompresses straight into a destination buffer. A blosc2 chunk
holds at most 2 GiB, so larger tensors are framed as a run of chunks of
``BLOCK`` bytes, each self-describing (blosc2 records its sizes).

When compression does not shrink the tensor (random or already-compressed
data), it is stored as it is, uncompressed: reads then cost nothing extra.
Which pays is measured per tensor kind in docs/performance.md.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping
from types import ModuleType
from typing import Any

import numpy as np

from tensorcache import codec
from tensorcache.client.items import GetItem, PutItem
from tensorcache.errors import DataCorruption, InvalidArgument
from tensorcache.proto import tensorcache_pb2 as pb

CODECS = ("none", "lz4", "zstd")
#: Bytes per blosc2 chunk (its limit is 2 GiB); a multiple of every itemsize.
BLOCK = 64 * 1024 * 1024
#: Levels: lz4 at 5 is still several GB/s per thread; zstd at 1 is its fast
#: end and already takes most of what zstd can take from float data.
LEVELS = {"lz4": 5, "zstd": 1}
_SHUFFLED_KINDS = "biufcmM"  # numbers (bool, ints, floats, complex, datetimes)


def _blosc2() -> ModuleType:
    try:
        return importlib.import_module("blosc2")
    except ImportError as exc:
        raise InvalidArgument(
            "compression needs blosc2: pip install 'tensorcache[compression]'"
        ) from exc


def check_codec(name: object, field: str = "compression") -> str:
    if not isinstance(name, str) or name not in CODECS:
        raise InvalidArgument(f"{field} must be one of {', '.join(CODECS)}; got {name!r}")
    return name


def check_defaults(defaults: Mapping[str, str]) -> dict[str, str]:
    """Validate a per-namespace default table: key prefix -> codec."""
    if not isinstance(defaults, Mapping):
        raise InvalidArgument(
            f"compression defaults must map key prefixes to codecs, got {type(defaults).__name__}"
        )
    out = {}
    for prefix, name in defaults.items():
        if not isinstance(prefix, str):
            raise InvalidArgument(f"compression defaults: prefix {prefix!r} is not a str")
        out[prefix] = check_codec(name, f"compression default for {prefix!r}")
    return out


def choose(key: str, explicit: str | None, defaults: Mapping[str, str]) -> str:
    """The codec for ``key``: the put's own, else the longest matching prefix's, else none."""
    if explicit is not None:
        return check_codec(explicit)
    best = ""
    name = "none"
    for prefix, codec_name in defaults.items():
        if key.startswith(prefix) and len(prefix) >= len(best):
            best, name = prefix, codec_name
    return name


def pack(array: object, name: str, *, threads: int = 0) -> tuple[np.ndarray, pb.Compression] | None:
    """``array`` compressed with codec ``name``, and its description; None: store it as is.

    None when ``name`` is "none", the array is empty, or compression would
    not make it smaller. ``threads``: blosc2 threads (0: blosc2's default).
    """
    layout, view = codec.encode(array)  # validates the dtype; a flat byte view
    if name == "none" or layout.nbytes == 0:
        return None
    blosc2 = _blosc2()
    dtype = np.dtype(layout.dtype)
    shuffle = dtype.kind in _SHUFFLED_KINDS and dtype.itemsize > 1
    typesize = dtype.itemsize if shuffle and dtype.itemsize <= 255 else 1
    kwargs = {
        "typesize": typesize,
        "clevel": LEVELS[name],
        "codec": blosc2.Codec.LZ4 if name == "lz4" else blosc2.Codec.ZSTD,
        "filters": [blosc2.Filter.SHUFFLE if shuffle else blosc2.Filter.NOFILTER],
    }
    if threads:
        kwargs["nthreads"] = threads
    parts = []
    total = 0
    for off in range(0, layout.nbytes, BLOCK):
        part = blosc2.compress2(view[off : off + BLOCK], **kwargs)
        total += len(part)
        if total >= layout.nbytes:
            return None  # no gain: store it as it is
        parts.append(part)
    packed = np.frombuffer(b"".join(parts) if len(parts) > 1 else parts[0], dtype=np.uint8)
    info = pb.Compression(
        codec=name,
        shuffle=shuffle,
        dtype=layout.dtype,
        shape=layout.shape,
        order=layout.order,
        nbytes=layout.nbytes,
    )
    return packed, info


def unpack(
    info: pb.Compression,
    payload: np.ndarray,
    out: np.ndarray | codec.OutView | None = None,
    logical: str = "",
) -> np.ndarray:
    """The tensor ``payload`` (compressed bytes, checksum already verified) stands for.

    ``out``: the caller's array to fill (same checks as ``get(out=...)``);
    ``logical``: the torch dtype it was written as (TensorMeta.logical_dtype).
    """
    if info.codec not in ("lz4", "zstd"):
        raise DataCorruption(f"stored with unknown compression {info.codec!r}")
    layout = codec.check_layout(info.dtype, tuple(info.shape), info.order, info.nbytes, logical)
    if out is None:
        array, dest = codec.allocate(layout)
    else:
        dest = codec.view_for(out, layout)
        array = out.array if isinstance(out, codec.OutView) else out
    blosc2 = _blosc2()
    src = payload.reshape(-1).view(np.uint8)
    pos = off = 0
    while pos < src.nbytes:
        try:
            nbytes, cbytes, _ = blosc2.get_cbuffer_sizes(src[pos : pos + 32])
            if cbytes <= 0 or pos + cbytes > src.nbytes or off + nbytes > layout.nbytes:
                raise ValueError("chunk sizes out of range")
            got = blosc2.decompress2(src[pos : pos + cbytes], dst=dest[off : off + nbytes])
        except (ValueError, RuntimeError) as exc:
            raise DataCorruption(f"compressed payload does not decode: {exc}") from exc
        if got is not None and got != nbytes:
            raise DataCorruption(f"compressed chunk decoded to {got} bytes, expected {nbytes}")
        pos += cbytes
        off += nbytes
    if off != layout.nbytes:
        raise DataCorruption(f"compressed payload decoded to {off} bytes, expected {layout.nbytes}")
    return array


def pack_many(
    values: Mapping[str, Any], explicit: str | None, defaults: Mapping[str, str]
) -> tuple[Mapping[str, Any], dict[str, pb.Compression]]:
    """Compress the values a put asks (or its key's namespace asks) to compress.

    Returns the values to store (compressed ones replaced by their bytes)
    and the description of each compressed one, by key. Values stored as
    they are pass through untouched.
    """
    if explicit is not None:
        check_codec(explicit)
    if explicit == "none" or (explicit is None and not defaults):
        return values, {}
    out: dict[str, Any] = {}
    packed: dict[str, pb.Compression] = {}
    for key, value in values.items():
        name = choose(key, explicit, defaults) if isinstance(key, str) else "none"
        got = pack(value, name) if name != "none" else None
        if got is None:
            out[key] = value
        else:
            out[key], packed[key] = got
    return out, packed


def describe(tensors: Iterable[PutItem], packed: Mapping[str, pb.Compression]) -> None:
    """Record in each compressed tensor's metadata how to restore it."""
    if packed:
        for it in tensors:
            info = packed.get(it.key)
            if info is not None:
                it.meta.compression.CopyFrom(info)


def restore(
    meta: pb.TensorMeta | None,
    array: np.ndarray | None,
    out: np.ndarray | codec.OutView | None,
) -> np.ndarray | None:
    """What a get returns for an entry read as ``array``: decompressed if it was stored so."""
    if array is None or meta is None or not meta.HasField("compression"):
        return array
    return unpack(meta.compression, array, out, meta.logical_dtype)


def restored(it: GetItem) -> tuple[np.ndarray | None, int, str]:
    """A found get item as a read returns it: (tensor, version, logical dtype)."""
    logical = it.meta.logical_dtype if it.meta is not None else ""
    return restore(it.meta, it.array, it.out), it.version, logical
