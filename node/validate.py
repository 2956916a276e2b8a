"""What a node checks of a request before it acts on it: headers, keys, metadata.

Pure functions over the wire messages (tensorcache.proto), shared by
node/ops.py and the adapters that parse headers (node/service.py,
node/dataserver.py, node/authz.py). Each error is an InvalidArgument that
names the field.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from tensorcache import codec
from tensorcache.errors import InvalidArgument
from tensorcache.keys import MAX_KEY_BYTES, MAX_SHARD_KEY_BYTES, check_key_bytes
from tensorcache.node.entry import Entry, StoreKey
from tensorcache.proto import tensorcache_pb2 as pb

M = TypeVar("M", bound=Message)


def parse_header(message_type: type[M], raw: bytes | None, what: str) -> M:
    """Parse a header we received as raw bytes; InvalidArgument if it is not one."""
    if raw is None:
        raise InvalidArgument(f"{what}: the stream carried no header")
    try:
        return message_type.FromString(raw)
    except DecodeError as exc:
        raise InvalidArgument(
            f"{what}: header of {len(raw)} bytes is not a valid {message_type.__name__}: {exc}"
        ) from exc


_KEY_LIMITS = {pb.TENSOR: MAX_KEY_BYTES, pb.SHARD: MAX_SHARD_KEY_BYTES}


def store_key(raw: bytes, kind: int, where: str) -> StoreKey:
    if kind not in (pb.TENSOR, pb.SHARD):
        raise InvalidArgument(f"{where}.kind {kind} is not a known EntryKind")
    limit = MAX_KEY_BYTES if kind == pb.TENSOR else MAX_SHARD_KEY_BYTES
    return (kind, check_key_bytes(raw, limit=limit, field=f"{where}.key"))


def store_keys(keys: Sequence[pb.EntryKey], what: str) -> list[StoreKey]:
    """``store_key`` of every key of a request, naming the field only when one is bad.

    The common case (a TENSOR or SHARD key of valid length and UTF-8) is
    checked inline, exactly as ``check_key_bytes`` does; anything else goes
    through ``store_key`` for its precise error. Why: building two field
    names per key was ~10 % of a one-key get's node time (py-spy, #18).
    """
    out: list[StoreKey] = []
    for i, k in enumerate(keys):
        raw, kind = k.key, k.kind
        limit = _KEY_LIMITS.get(kind, 0)
        if 0 < len(raw) <= limit:
            try:
                out.append((kind, raw.decode("utf-8")))
                continue
            except UnicodeDecodeError:
                pass
        out.append(store_key(raw, kind, f"{what}[{i}]"))
    return out


def check_meta(meta: pb.TensorMeta, kind: int, where: str) -> int:
    """Validate a put's metadata; return the payload bytes the entry carries."""
    compressed = meta.HasField("compression")
    codec.check_layout(
        meta.dtype,
        list(meta.shape),
        meta.order,
        meta.nbytes,
        "" if compressed else meta.logical_dtype,
    )
    if compressed and meta.logical_dtype:  # it describes the uncompressed tensor
        codec.check_logical(meta.logical_dtype, meta.compression.dtype)
    if not meta.stripes:
        return meta.nbytes
    if kind != pb.TENSOR:
        raise InvalidArgument(f"{where}: only a TENSOR entry may have stripes")
    offset = 0
    for i, ref in enumerate(meta.stripes):
        check_key_bytes(ref.key, limit=MAX_SHARD_KEY_BYTES, field=f"{where}.stripes[{i}].key")
        if ref.offset != offset or ref.nbytes == 0:
            raise InvalidArgument(
                f"{where}.stripes[{i}] covers [{ref.offset}, +{ref.nbytes}); "
                f"expected a non-empty stripe at offset {offset}"
            )
        offset += ref.nbytes
    if offset != meta.nbytes:
        raise InvalidArgument(
            f"{where}: stripes cover {offset} bytes, meta.nbytes is {meta.nbytes}"
        )
    return 0


def tensor_meta(entry: Entry) -> pb.TensorMeta:
    """An entry's metadata as a message (the store keeps it serialized).

    A parsed TensorMeta held per entry cost ~400 bytes of RAM (upb keeps the
    whole request's arena alive through a sub-message), its bytes ~90: with
    millions of small entries that is most of a node's memory (#17).
    """
    return pb.TensorMeta.FromString(entry.meta)
