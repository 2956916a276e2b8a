"""Keys: what a user may name a tensor, and how stripes of large tensors are named.

A user key is a ``str`` of 1..1024 UTF-8 bytes. On the wire it travels as
bytes (so a node, not the protobuf parser, decides and says what is wrong
with a bad one). Stripes live in their own ``EntryKind.SHARD`` namespace, so
no user key can collide with a stripe key whatever characters it holds.
"""

from __future__ import annotations

from typing import cast

from tensorcache.errors import InvalidArgument
from tensorcache.proto import tensorcache_pb2 as pb

MAX_KEY_BYTES = 1024
# A shard key is the user key plus "\0<put id hex>\0<index>".
MAX_SHARD_KEY_BYTES = MAX_KEY_BYTES + 64


def encode_key(key: object, *, field: str = "key") -> bytes:
    """Validate a user key and return its UTF-8 bytes."""
    if not isinstance(key, str):
        raise InvalidArgument(f"{field} must be a str, got {type(key).__name__}")
    try:
        raw = key.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidArgument(f"{field} is not valid UTF-8: {exc.reason} at {exc.start}") from exc
    check_key_bytes(raw, limit=MAX_KEY_BYTES, field=field)
    return raw


def check_key_bytes(raw: bytes, *, limit: int, field: str = "key") -> str:
    """Check a key received as bytes; return it decoded. Raises InvalidArgument."""
    if not raw:
        raise InvalidArgument(f"{field} is empty (keys are 1..{MAX_KEY_BYTES} UTF-8 bytes)")
    if len(raw) > limit:
        raise InvalidArgument(f"{field} is {len(raw)} bytes, more than the limit of {limit}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"{field} is not valid UTF-8 (byte {exc.start})") from exc


def shard_key(key: str, put_id: int, index: int) -> str:
    """The key of stripe ``index`` of the put ``put_id`` of tensor ``key``."""
    return f"{key}\0{put_id:016x}\0{index}"


def entry_kind(kind: int) -> pb.EntryKind:
    """A stored entry's kind number (TENSOR, SHARD) as the generated code types it."""
    return cast("pb.EntryKind", kind)
