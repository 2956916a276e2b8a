"""The client's write path: puts (stripes, primary, replicas) and deletes.

``Client.put``/``put_many``/``delete`` (client/api.py) check their
arguments; the order of the writes, which is what makes a put atomic for
readers, is here:

1. stripes of large tensors first (client/striping.py), nowhere reachable
   until their manifest commits;
2. the primary write of each tensor (or manifest), which assigns its version;
3. then every other replica stores exactly that version.

A write that fails frees the stripes of manifests that did not commit; one
that succeeds frees the stripes of the values it replaced. Both are best
effort: a leftover stripe is unreachable and evicted like any entry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from tensorcache.client import compress, present, striping
from tensorcache.client.config import ClientConfig
from tensorcache.client.fanout import Count, FanOut
from tensorcache.client.items import DelItem, PutItem
from tensorcache.client.nearcache import NearCache
from tensorcache.client.nodes import NodeTransport
from tensorcache.client.placement import Placement
from tensorcache.errors import InvalidArgument, TensorCacheError
from tensorcache.keys import encode_key
from tensorcache.proto import tensorcache_pb2 as pb


class Writes:
    """Writes over the client's seams (fan-out, placement, node transport, near-cache)."""

    def __init__(
        self,
        fan: FanOut,
        placement: Placement,
        nodes: NodeTransport,
        near: NearCache | None,
        config: ClientConfig,
        stripe_size: Callable[[], int],
        count: Count,
    ) -> None:
        self._fan = fan
        self._placement = placement
        self._nodes = nodes
        self._near = near
        self._config = config
        self._stripe_size = stripe_size
        self._count = count

    def _replicas(self) -> int:
        return self._placement.current().replicas

    def put_many(
        self,
        values: Mapping[str, Any],
        conditions: dict[str, int] | None,
        compression: str | None = None,
        *,
        pin: bool = False,
    ) -> dict[str, int]:
        """Store ``values`` (``conditions``: key -> if_version); returns key -> version."""
        if not isinstance(values, Mapping):
            raise InvalidArgument(
                f"put_many takes a mapping of key -> array, got {type(values).__name__}"
            )
        encoded = present.encode_values(values)
        copies = self._replicas()
        values, packed = compress.pack_many(encoded, compression, self._config.compression)
        tensors, shards = striping.plan(values, self._stripe_size(), copies, conditions, pin)
        compress.describe(tensors, packed)
        present.keep_logical(tensors, packed, encoded)
        if shards:
            striping.check_fits(self._placement.current(), shards)
            try:
                self._fan.scatter(shards, self._nodes.put)  # stripes first: the manifest commits
            except TensorCacheError:
                self.free_stripes([r for it in tensors for r in it.meta.stripes])
                raise
        try:
            self._fan.scatter(tensors, self._nodes.put)  # the primary assigns each version
            if copies > 1:
                # Then every other replica stores exactly that version. The
                # put returns only once all of them have (docs/consistency.md).
                # They are placed with the ring of now, leaving out the member
                # that took the primary write: if the ring changed in between,
                # the key's new primary must get a copy too.
                self._fan.scatter(
                    [
                        PutItem(
                            it.key,
                            it.kind,
                            it.meta,
                            it.view,
                            replica=i if it.placed else i + 1,
                            exact=it.version,
                            skip=it.placed,
                        )
                        for it in tensors
                        for i in range(copies - 1)
                    ],
                    self._nodes.put,
                )
        except TensorCacheError:
            # Stripes of manifests that did not commit are unreachable: free them.
            self.free_stripes([r for it in tensors if not it.version for r in it.meta.stripes])
            raise
        # Never a stripe this put wrote: a resent write (its first reply was
        # lost after the node committed) replaces its own first commit, and a
        # node before the fix in node/ops.py reports those stripes as replaced.
        own = {ref.key for it in tensors for ref in it.meta.stripes}
        self.free_stripes([ref for it in tensors for ref in it.replaced if ref.key not in own])
        if self._near is not None:
            for it in tensors:
                self._near.drop(it.key)
        self._count("puts", len(tensors), bytes_put=sum(it.meta.nbytes for it in tensors))
        return {it.key: it.version for it in tensors}

    def delete(self, key: str) -> bool:
        """Remove ``key`` from every replica; returns whether it was present."""
        encode_key(key)
        items = [DelItem(key, pb.TENSOR, replica=i) for i in range(self._replicas())]
        self._fan.scatter(items, self._nodes.delete)
        stripes = {ref.key: ref for it in items for ref in it.stripes}
        self.free_stripes(list(stripes.values()))
        if self._near is not None:
            self._near.drop(key)
        self._count("deletes")
        return any(it.found for it in items)

    def free_stripes(self, refs: list[pb.StripeRef]) -> None:
        """Delete stripes of replaced/deleted tensors; best effort."""
        striping.free(
            refs,
            self._replicas(),
            lambda items: self._fan.scatter(items, self._nodes.delete),
            self._count,
        )
