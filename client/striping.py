"""Striping: a large tensor as stripes on many nodes, committed by a manifest.

A tensor of at most ``stripe_size`` bytes is one entry on the node that owns
its key. A larger one is cut into stripes; each stripe is an entry of kind
SHARD whose key embeds a random *put id*, so it hashes (and lands)
independently and stripes of two puts of the same key never overwrite each
other. The put writes every stripe first and then a *manifest* (dtype,
shape, and each stripe's key, offset, size and CRC32C) under the tensor's
own key: the manifest is the commit point, so a put is visible only once all
of it is stored. A get reads the manifest, fetches the stripes in parallel
straight into one preallocated array, and checks each stripe against the
manifest; a missing or mismatched stripe is a miss, never garbage.
"""

from __future__ import annotations

import logging
import secrets
from collections import defaultdict
from collections.abc import Callable, Mapping

import numpy as np

from tensorcache import codec
from tensorcache.client.items import DelItem, GetItem, PutItem, destination, layout_of, packed
from tensorcache.errors import CapacityExceeded, ProtocolError, TensorCacheError
from tensorcache.keys import encode_key, shard_key
from tensorcache.proto import tensorcache_pb2 as pb
from tensorcache.ring import Ring

log = logging.getLogger("tensorcache.client")

Count = Callable[..., None]


def plan(
    values: Mapping[str, np.ndarray],
    stripe: int,
    copies: int,
    conditions: dict[str, int] | None,
    pin: bool = False,
) -> tuple[list[PutItem], list[PutItem]]:
    """(tensors, stripes) to write for ``values``: stripes carry every copy.

    A tensor's item is its whole payload, or a manifest (no payload) whose
    stripes are items of their own, one per replica copy. ``pin``: the
    manifest and every stripe are pinned (node/pins.py).
    """
    tensors: list[PutItem] = []
    shards: list[PutItem] = []
    for key, value in values.items():
        encode_key(key)
        cond = conditions.get(key) if conditions else None
        layout, view = codec.encode(value)
        meta = pb.TensorMeta(
            dtype=layout.dtype,
            shape=layout.shape,
            order=layout.order,
            nbytes=layout.nbytes,
            logical_dtype=layout.logical,
            pinned=pin,
        )
        # Random per put: names a striped value's stripes, and lets a node
        # recognize a put resent after its reply was lost (node/ops.py).
        meta.put_id = secrets.randbits(63) | 1
        if layout.nbytes <= stripe:
            meta.crc32c = codec.crc32c(view)
            tensors.append(PutItem(key, pb.TENSOR, meta, view, cond=cond))
            continue
        for i, off in enumerate(range(0, layout.nbytes, stripe)):
            part = view[off : off + stripe]
            skey = shard_key(key, meta.put_id, i)
            ref = meta.stripes.add(
                key=skey.encode(), offset=off, nbytes=part.nbytes, crc32c=codec.crc32c(part)
            )
            smeta = pb.TensorMeta(
                dtype="|u1",
                shape=[part.nbytes],
                order="C",
                nbytes=part.nbytes,
                crc32c=ref.crc32c,
                put_id=meta.put_id,
                pinned=pin,
            )
            shards.extend(PutItem(skey, pb.SHARD, smeta, part, replica=c) for c in range(copies))
        tensors.append(PutItem(key, pb.TENSOR, meta, None, cond=cond))
    return tensors, shards


def check_fits(ring: Ring, shards: list[PutItem]) -> None:
    """Refuse, before sending a byte, stripes that cannot fit on their nodes.

    Without this a tensor larger than the cluster would evict every other
    entry on its way to failing. Each copy counts on the member that will
    hold it (``replica_set(key)[copy]``), not all on the primary.
    """
    need: dict[str, int] = defaultdict(int)
    for it in shards:
        copies = ring.replica_set(it.key)
        if it.replica < len(copies):
            need[copies[it.replica].name] += it.nbytes
    for name, nbytes in need.items():
        member = ring.member(name)
        if member is not None and nbytes > member.capacity:
            total = sum(m.capacity for m in ring.members)
            raise CapacityExceeded(
                f"stripes need {nbytes} bytes on node {name} of capacity {member.capacity} "
                f"({sum(need.values())} bytes in all; the cluster holds {total} bytes)"
            )


def fetch(
    tensors: list[GetItem], read: Callable[[list[GetItem]], None], count: Count
) -> list[bool]:
    """Fetch every stripe of every manifest into its tensor's array; which succeeded."""
    parts: list[tuple[GetItem, GetItem]] = []
    for t in tensors:
        assert t.meta is not None
        layout = layout_of(t.meta, f"manifest of {t.key!r}")
        t.array, whole = destination(None if packed(t.meta) else t.out, layout)
        for ref in t.meta.stripes:
            if ref.offset + ref.nbytes > whole.nbytes:
                raise ProtocolError(f"manifest of {t.key!r}: stripe beyond the tensor")
            part = GetItem(
                ref.key.decode(),
                pb.SHARD,
                dest=whole[ref.offset : ref.offset + ref.nbytes],
                expect=ref,
                put_id=t.meta.put_id,
            )
            parts.append((t, part))
    read([p for _, p in parts])
    good: dict[int, bool] = {id(t): True for t in tensors}
    for t, p in parts:
        if not stripe_ok(p):
            good[id(t)] = False
    for t in tensors:
        if not good[id(t)]:
            count("stripe_misses")
            t.array = None
    return [good[id(t)] for t in tensors]


def stripe_ok(p: GetItem) -> bool:
    """Whether a fetched stripe is exactly the one its manifest names (else: a miss)."""
    return (
        p.found
        and p.ok
        and p.meta is not None
        and p.expect is not None
        and p.meta.put_id == p.put_id
        and p.meta.nbytes == p.expect.nbytes
        and p.meta.crc32c == p.expect.crc32c
    )


def free(
    refs: list[pb.StripeRef],
    copies: int,
    delete: Callable[[list[DelItem]], None],
    count: Count,
) -> None:
    """Delete stripes of replaced/deleted tensors; best effort (eviction reclaims the rest)."""
    if not refs:
        return
    try:
        delete([DelItem(r.key.decode(), pb.SHARD, replica=i) for r in refs for i in range(copies)])
    except TensorCacheError as exc:
        count("stripe_free_failures")
        log.info("could not free %d old stripes (%s); eviction will reclaim them", len(refs), exc)
