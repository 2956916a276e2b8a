"""Where the etcd-backed membership keeps its facts, and how each record is written.

Under a prefix (default ``/tensorcache/``)::

    members/<name>           serialized pb.Member, attached to an etcd lease of ttl_s
    invalidations/<b64>      a namespace invalidation; <b64> is the prefix, urlsafe
                             base64 of its UTF-8; the record's epoch is the key's
                             mod_revision (the value is the prefix, for people)
    ring-epoch               the cluster's epoch, 20-digit zero-padded decimal

Routers announce themselves beside (not under) the watched prefix, at
``<prefix minus its '/'>-routers/<address>`` on a lease of their own, so
their comings and goings are never membership changes.

Pure: no I/O. Malformed records are logged and reported as ``None``, never raised.
"""

from __future__ import annotations

import base64
import binascii
import logging
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from tensorcache import wire
from tensorcache.proto import tensorcache_pb2 as pb
from tensorcache.ring import RingMember

log = logging.getLogger("tensorcache.router")

DEFAULT_PREFIX = "/tensorcache/"
_EPOCH_WIDTH = 20  # digits of a uint64: byte order == numeric order


@dataclass(frozen=True, slots=True)
class EtcdKeys:
    """The keys of one cluster, all derived from its prefix (see the module docstring)."""

    watch: bytes  # the prefix itself: members, invalidations and ring-epoch
    members: bytes
    invalidations: bytes
    epoch: bytes
    routers: bytes

    @classmethod
    def under(cls, prefix: str = DEFAULT_PREFIX) -> EtcdKeys:
        if not prefix.endswith("/"):
            raise ValueError(f"prefix {prefix!r} must end with '/'")
        return cls(
            watch=prefix.encode(),
            members=f"{prefix}members/".encode(),
            invalidations=f"{prefix}invalidations/".encode(),
            epoch=f"{prefix}ring-epoch".encode(),
            routers=f"{prefix.rstrip('/')}-routers/".encode(),
        )

    def member(self, name: str) -> bytes:
        return self.members + name.encode()

    def invalidation(self, prefix: str) -> bytes:
        return self.invalidations + encode_prefix(prefix)

    def router(self, address: str) -> bytes:
        return self.routers + address.encode()


def epoch_value(epoch: int) -> bytes:
    """ring-epoch's value: zero padding makes etcd's byte comparison a numeric one."""
    return str(epoch).zfill(_EPOCH_WIDTH).encode()


def parse_epoch(key: bytes, value: bytes) -> int | None:
    try:
        return int(value)
    except ValueError:
        log.error("etcd key %r holds %r, not an epoch; ignored", key, value)
        return None


def member_record(member: RingMember) -> bytes:
    return wire.to_pb(member).SerializeToString()


def parse_member(key: bytes, value: bytes) -> RingMember | None:
    try:
        return wire.from_pb(pb.Member.FromString(value))
    except DecodeError:
        log.error("etcd key %r does not hold a pb.Member; ignored", key)
        return None


def encode_prefix(prefix: str) -> bytes:
    """An invalidated prefix as an etcd key segment (any text, "" included)."""
    return base64.urlsafe_b64encode(prefix.encode())


def decode_prefix(segment: bytes) -> str:
    return base64.urlsafe_b64decode(segment).decode()


def invalidated_prefix(segment: bytes) -> str | None:
    """The prefix an invalidations/ key names; None (logged) for a foreign key."""
    try:
        return decode_prefix(segment)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        log.error("etcd key segment %r is not an encoded prefix; ignored", segment)
        return None
