"""Work items of the fan-out, and the requests and replies they map to.

A public call turns into items (one entry to write, read or delete, one fill
question); the fan-out (client/fanout.py) groups them per node and hands each
batch to a node transport (client/nodes.py), which builds the request with
the functions here, moves the bytes its own way, and applies the reply back
onto the items with them. The in-memory fake (tensorcache/testing.py) uses
the same functions, so what a request says and what a reply means is written
once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from tensorcache import codec
from tensorcache.errors import InvalidArgument, ProtocolError
from tensorcache.keys import entry_kind
from tensorcache.proto import tensorcache_pb2 as pb


@dataclass(eq=False)
class PutItem:
    """One entry to write: a small tensor, a stripe, or a manifest."""

    key: str
    kind: int
    meta: pb.TensorMeta
    view: np.ndarray | None  # payload (None for a manifest)
    version: int = 0
    replaced: list[pb.StripeRef] = field(default_factory=list)
    cond: int | None = None  # if_version of a conditional put
    replica: int = 0  # which copy: 0 = the primary, i = replica_set(key)[i]
    exact: int = 0  # a replica copy: store exactly this version (the primary's)
    #: A replica copy: the member that took the primary write, left out of
    #: the replica set when placing it (the ring may have changed meanwhile).
    skip: str = ""
    placed: str = ""  # set by the fan-out: the member that took this item

    @property
    def nbytes(self) -> int:
        return 0 if self.view is None else self.view.nbytes


@dataclass(eq=False)
class GetItem:
    """One entry to read; ``dest`` is where its payload goes (None: allocate)."""

    key: str
    kind: int
    found: bool = False
    version: int = 0
    meta: pb.TensorMeta | None = None
    array: np.ndarray | None = None
    dest: np.ndarray | None = None  # flat uint8 destination
    expect: pb.StripeRef | None = None  # for stripes: what the manifest promised
    put_id: int = 0
    ok: bool = False
    out: np.ndarray | codec.OutView | None = None  # the caller's array to fill (get(out=...))
    # Where an uncompressed payload goes, chosen once its header is known:
    # (array, flat byte view); a staged CUDA get's pinned slot (client/staging.py).
    stage: Callable[[codec.Layout], tuple[np.ndarray, np.ndarray]] | None = None
    replica: int = 0  # failover cursor into replica_set(key)
    skip: str = ""
    placed: str = ""

    @property
    def nbytes(self) -> int:
        return self.expect.nbytes if self.expect is not None else 0


@dataclass(eq=False)
class FillItem:
    """One Fill RPC (ask, renew or release a fill grant; client/fill.py)."""

    key: str
    holder: str
    filler: str
    ttl_ms: int
    release: bool
    timeout_s: float
    reply: pb.FillReply | None = None
    nbytes = 0
    replica = 0
    skip = ""
    placed = ""


@dataclass(eq=False)
class DelItem:
    key: str
    kind: int
    found: bool = False
    stripes: list[pb.StripeRef] = field(default_factory=list)
    replica: int = 0  # which copy to delete
    skip: str = ""
    placed: str = ""

    nbytes = 0


# ------------------------------------------------------------------ requests
def put_request(epoch: int, batch: list[PutItem]) -> tuple[pb.PutRequest, list[np.ndarray]]:
    """The PutRequest header of ``batch`` and the payload views, in order."""
    header = pb.PutRequest(epoch=epoch)
    for it in batch:
        entry = header.entries.add(key=it.key.encode(), kind=it.kind, meta=it.meta)
        if it.cond is not None:
            entry.if_version = it.cond
        if it.exact:
            entry.version = it.exact
    return header, [it.view for it in batch if it.view is not None]


def get_request(epoch: int, batch: list[GetItem], *, head_only: bool = False) -> pb.GetRequest:
    return pb.GetRequest(
        epoch=epoch,
        head_only=head_only,
        keys=[pb.EntryKey(key=it.key.encode(), kind=entry_kind(it.kind)) for it in batch],
    )


def delete_request(epoch: int, batch: list[DelItem]) -> pb.DeleteRequest:
    return pb.DeleteRequest(
        epoch=epoch,
        keys=[pb.EntryKey(key=it.key.encode(), kind=entry_kind(it.kind)) for it in batch],
    )


def fill_request(epoch: int, it: FillItem) -> pb.FillRequest:
    return pb.FillRequest(
        epoch=epoch,
        key=it.key.encode(),
        holder=it.holder,
        ttl_ms=it.ttl_ms,
        release=it.release,
        filler=it.filler,
    )


# ------------------------------------------------------------------ replies
def apply_put_reply(batch: list[PutItem], reply: pb.PutReply, where: str) -> None:
    if len(reply.results) != len(batch):
        raise ProtocolError(f"{where} answered {len(reply.results)} of {len(batch)} puts")
    for it, res in zip(batch, reply.results, strict=True):
        it.version = res.version
        it.replaced = list(res.replaced_stripes)


def apply_head_reply(batch: list[GetItem], reply: pb.GetReply, where: str) -> None:
    if len(reply.entries) != len(batch):
        raise ProtocolError(f"{where}: {len(reply.entries)} headers for {len(batch)} keys")
    for it, got in zip(batch, reply.entries, strict=True):
        it.found, it.version = got.found, got.version


def apply_delete_reply(batch: list[DelItem], reply: pb.DeleteReply, where: str) -> None:
    if len(reply.results) != len(batch):
        raise ProtocolError(f"{where}: {len(reply.results)} results for {len(batch)} keys")
    for it, res in zip(batch, reply.results, strict=True):
        it.found = res.found
        it.stripes = list(res.stripes)


def layout_of(meta: pb.TensorMeta, where: str) -> codec.Layout:
    """A node's metadata as a layout; bad metadata is the node's protocol error."""
    try:
        logical = "" if packed(meta) else meta.logical_dtype  # else: of the uncompressed tensor
        return codec.check_layout(meta.dtype, tuple(meta.shape), meta.order, meta.nbytes, logical)
    except InvalidArgument as exc:
        raise ProtocolError(f"{where}: node sent bad metadata: {exc}") from exc


def packed(meta: pb.TensorMeta) -> bool:
    """Whether an entry holds a tensor the client compressed (client/compress.py)."""
    return meta.HasField("compression")


def destination(
    out: np.ndarray | codec.OutView | None, layout: codec.Layout
) -> tuple[np.ndarray, np.ndarray]:
    """(the array to return, its flat byte view): a new one, or the caller's ``out``."""
    if out is None:
        try:
            return codec.allocate(layout)
        except (ValueError, MemoryError) as exc:
            raise ProtocolError(f"cannot allocate {layout}: {exc}") from exc
    view = codec.view_for(out, layout)
    return (out.array if isinstance(out, codec.OutView) else out), view


def payload_destinations(
    batch: list[GetItem], reply: pb.GetReply, where: str
) -> tuple[list[GetItem], list[tuple[GetItem, list[tuple[int, int]]]]]:
    """Record what each key's header says and allocate where its payload goes.

    Returns the items whose bytes follow the header, in order (their ``dest``
    set), and those answered with addresses in the node's memory instead
    (co-located reads), with their chunks.
    """
    if len(reply.entries) != len(batch):
        raise ProtocolError(f"{where}: {len(reply.entries)} headers for {len(batch)} keys")
    carrying: list[GetItem] = []
    shared: list[tuple[GetItem, list[tuple[int, int]]]] = []
    for it, got in zip(batch, reply.entries, strict=True):
        it.found, it.version = got.found, got.version
        if not got.found:
            continue
        it.meta = got.meta
        if got.meta.stripes:
            continue  # a manifest: no payload of its own
        layout = layout_of(got.meta, where)
        if it.expect is None:  # a tensor: its own (or the caller's) array
            # Compressed: received into a buffer of its own, decompressed into out.
            if it.stage is not None and not packed(got.meta):
                it.array, it.dest = it.stage(layout)
            else:
                it.array, it.dest = destination(None if packed(got.meta) else it.out, layout)
        elif it.dest is None or it.dest.nbytes != layout.nbytes:
            it.dest = np.empty(layout.nbytes, np.uint8)  # unlike its manifest: a miss
        if got.local:
            shared.append((it, [(c.addr, c.nbytes) for c in got.local]))
        else:
            carrying.append(it)
    return carrying, shared


def check_payloads(carrying: list[GetItem], crcs: list[int]) -> list[GetItem]:
    """Mark each received payload ok or not by its checksum; returns the corrupt ones.

    A corrupt entry becomes a miss (never garbage).
    """
    bad: list[GetItem] = []
    for it, crc in zip(carrying, crcs, strict=True):
        assert it.meta is not None
        it.ok = crc == it.meta.crc32c
        if not it.ok:
            bad.append(it)
            it.found, it.array = False, None
    return bad
