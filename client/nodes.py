"""The client's seam to nodes: one interface, and the network implementation.

``NodeTransport`` is what the rest of the client knows of a node: put, get,
head (versions only), delete and fill a batch of work items (client/items.py)
at one member under one ring epoch, fence it, read its stats. Errors come
out of it as the one exception tree (tensorcache.errors); a node that
cannot be reached is ``Unavailable``, whatever the path.

``NetworkTransport`` is the real thing: bulk bytes over each node's TCP data
channel (client/datachannel.py), entries of a co-located node copied
straight out of its memory (tensorcache/localread.py), and the control-size
calls (version checks, deletes, fills) over that same channel; gRPC as the
fallback when the data channel fails, and for fence, pin and stat. The
in-memory fake (tensorcache/testing.py) implements the same interface, so
placement, striping, failover, replica confirmation and conditional puts are
tested without processes.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Protocol

import grpc
import numpy as np

from tensorcache import codec, localread
from tensorcache.authgrpc import Credentials
from tensorcache.client.config import ClientConfig
from tensorcache.client.datachannel import DataPool
from tensorcache.client.items import (
    DelItem,
    FillItem,
    GetItem,
    PutItem,
    apply_delete_reply,
    apply_head_reply,
    apply_put_reply,
    check_payloads,
    delete_request,
    fill_request,
    get_request,
    payload_destinations,
    put_request,
)
from tensorcache.client.tickets import TicketSource, issuer
from tensorcache.client.transport import ConnPool, payload_messages, read_payload
from tensorcache.dataproto import OP_DELETE, OP_FILL, OP_GET
from tensorcache.errors import InvalidArgument, ProtocolError, Unavailable, from_rpc_error
from tensorcache.proto import tensorcache_pb2 as pb
from tensorcache.ring import RingMember

log = logging.getLogger("tensorcache.client")

Count = Callable[..., None]  # Client._count: (name, n=1, **more)


class NodeTransport(Protocol):
    """Calls to one node. Each raises a TensorCacheError (Unavailable: unreachable)."""

    def put(self, member: RingMember, epoch: int, batch: list[PutItem]) -> None: ...

    def get(self, member: RingMember, epoch: int, batch: list[GetItem]) -> None: ...

    def head(self, member: RingMember, epoch: int, batch: list[GetItem]) -> None: ...

    def delete(self, member: RingMember, epoch: int, batch: list[DelItem]) -> None: ...

    def fill(self, member: RingMember, epoch: int, batch: list[FillItem]) -> None: ...

    def fence(self, member: RingMember, epoch: int, timeout_s: float) -> int | None:
        """Bring the node up to ``epoch``; its epoch after, or None if it cannot be
        reached at all (presumed dead: a dead process serves nothing)."""
        ...

    def stat(
        self, member: RingMember, timeout_s: float, request: pb.StatRequest | None = None
    ) -> pb.NodeStats: ...

    def pin(self, member: RingMember, request: pb.PinRequest, timeout_s: float) -> pb.PinReply: ...

    def close(self) -> None: ...


@contextlib.contextmanager
def rpc(where: str) -> Iterator[None]:
    """The one place a gRPC error becomes the client's exception tree."""
    try:
        yield
    except grpc.RpcError as exc:
        raise from_rpc_error(exc, where) from exc


class NetworkTransport:
    """Nodes over the network: data channel, co-located reads, gRPC fallback."""

    def __init__(self, config: ClientConfig, count: Count) -> None:
        self._config = config
        self._count = count
        creds = Credentials(config.token, config.tls)
        self._conns = ConnPool(creds)
        # Data addresses whose node wants a ticket -> that node's gRPC address.
        self._ticketed: dict[str, str] = {}
        self._data = DataPool(
            config.timeout_s, token=config.token, tls=creds.data_context, tickets=self._ticket
        )
        self._local: dict[bytes, bool] = {}
        self._no_control: set[str] = set()  # data addresses of nodes without OP_DELETE/OP_FILL

    def close(self) -> None:
        self._conns.close()
        self._data.close()

    def deadline(self, nbytes: int) -> float:
        """An RPC's time limit: a base plus the bytes at the slowest rate we accept."""
        return self._config.timeout_s + nbytes / self._config.min_throughput

    # -- paths ----------------------------------------------------------------
    def _data_channel(self, member: RingMember) -> bool:
        if member.data_ticket:
            self._ticketed[member.data_address] = member.address
        elif member.data_address in self._ticketed:  # restarted with encryption on
            self._ticketed.pop(member.data_address, None)
        return self._config.transport == "auto" and bool(member.data_address)

    def _ticket(self, data_address: str) -> TicketSource | None:
        """How to get a ticket for ``data_address`` (None: its node wants none)."""
        address = self._ticketed.get(data_address)
        if address is None:
            return None
        return issuer(self._conns.get(address).channel, address, self._config.timeout_s)

    def _data_fallback(self, member: RingMember, exc: Exception) -> None:
        """The data channel failed: this call goes over gRPC instead (counted)."""
        self._count("data_fallbacks")
        log.info("data channel of %s unavailable (%s); using gRPC", member.name, exc)

    def _is_local(self, member: RingMember) -> bool:
        """Whether this process can read ``member``'s memory (probed once per token)."""
        if not (self._config.local_fastpath and member.local_pid and member.local_token):
            return False
        seen = self._local.get(member.local_token)
        if seen is None:
            seen = localread.probe(member.local_pid, member.local_token_addr, member.local_token)
            self._local[member.local_token] = seen
        return seen

    def _read_local(self, member: RingMember, it: GetItem, chunks: list[tuple[int, int]]) -> bool:
        assert it.dest is not None and it.meta is not None
        if not localread.read_remote(member.local_pid, chunks, it.dest):
            return False
        self._count("local_reads")
        it.ok = (
            codec.crc32c(it.dest) == it.meta.crc32c if self._config.verify_local_checksums else True
        )
        if not it.ok:
            self._count("corrupt")
            it.found, it.array = False, None
        return True

    # -- calls ----------------------------------------------------------------
    def put(self, member: RingMember, epoch: int, batch: list[PutItem]) -> None:
        header, views = put_request(epoch, batch)
        reply: pb.PutReply | None = None
        if self._data_channel(member):
            try:
                with self._data.connection(member.data_address) as dc:
                    reply = dc.put(header, views)
            except Unavailable as exc:  # a put is all-or-nothing: safe to resend
                self._data_fallback(member, exc)
        if reply is None:
            head = header.SerializeToString()

            def stream() -> Iterator[bytes]:
                yield head
                yield from payload_messages(views, self._config.chunk_size)

            nbytes = sum(v.nbytes for v in views)
            with rpc(f"put to node {member.address}"):
                reply = self._conns.get(member.address).put(stream(), timeout=self.deadline(nbytes))
        apply_put_reply(batch, reply, f"node {member.address}")

    def get(self, member: RingMember, epoch: int, batch: list[GetItem], local: bool = True) -> None:
        request = get_request(epoch, batch)
        where = f"get from node {member.address}"
        carrying: list[GetItem] = []
        shared: list[tuple[GetItem, list[tuple[int, int]]]] = []

        def destinations(reply: pb.GetReply) -> list[np.ndarray]:
            carrying[:], shared[:] = payload_destinations(batch, reply, where)
            return [it.dest for it in carrying if it.dest is not None]

        crcs: list[int] | None = None
        if self._data_channel(member):
            request.local = local and self._is_local(member)
            gone: list[GetItem] = []
            try:
                with self._data.connection(member.data_address) as dc:
                    _, crcs = dc.get(request, destinations)
                    # Co-located: copy straight out of the node's memory while
                    # we hold the connection (the node pins those buffers until
                    # our next request on it). Failures refetch over the network.
                    gone = [it for it, ch in shared if not self._read_local(member, it, ch)]
                    if shared:
                        dc.release()  # unpin now, not at our next request
            except Unavailable as exc:
                self._data_fallback(member, exc)
                crcs = None
                carrying.clear()
                shared.clear()
                request.local = False
            else:
                if gone:
                    self._count("local_fallbacks", len(gone))
                    for it in gone:
                        it.found = False
                    self.get(member, epoch, gone, local=False)
        if crcs is None:
            nbytes = sum(it.nbytes for it in batch)
            with rpc(where):
                stream = self._conns.get(member.address).get(request, timeout=self.deadline(nbytes))
                first = next(stream, None)
                if first is None:
                    raise ProtocolError(f"{where}: empty reply stream")
                crcs = read_payload(stream, destinations(pb.GetReply.FromString(first)), where)
        for it in check_payloads(carrying, crcs):
            self._count("corrupt")
            log.warning("%s: %r failed its checksum; treated as a miss", where, it.key[:80])

    def _control(self, member: RingMember, op: int, request: bytes) -> bytes | None:
        """A control-size request over the data channel: its reply header, or None
        when the caller must use gRPC (no channel, or it failed: counted).

        Why: a gRPC call costs ~3x the data channel's wire time for a small
        request (docs/performance.md), and version checks (near-cache
        revalidation, KV matches) come in bursts. Resending over gRPC after a
        failure is safe for all of them: a head reads; a fill by the same
        holder renews its own lease; a delete leaves the key gone either way
        (only ``found`` may then say False for a key the first try removed).
        """
        if not self._data_channel(member) or member.data_address in self._no_control:
            return None
        try:
            return self._data.control(member.data_address, op, request)
        except Unavailable as exc:
            self._data_fallback(member, exc)
        except InvalidArgument as exc:
            # A node from before these ops (a rolling upgrade) answers
            # "unknown data channel op N": use gRPC with it from now on.
            if "unknown data channel op" not in str(exc):
                raise
            self._no_control.add(member.data_address)
            self._data_fallback(member, exc)
        return None

    def head(self, member: RingMember, epoch: int, batch: list[GetItem]) -> None:
        """Versions only (GetRequest.head_only: no payload), data channel first."""
        where = f"version from node {member.address}"
        request = get_request(epoch, batch, head_only=True)
        raw = self._control(member, OP_GET, request.SerializeToString())
        if raw is None:
            with rpc(where):
                raw = next(
                    self._conns.get(member.address).get(request, timeout=self._config.timeout_s),
                    None,
                )
            if raw is None:
                raise ProtocolError(f"{where}: empty reply stream")
        apply_head_reply(batch, pb.GetReply.FromString(raw), where)

    def delete(self, member: RingMember, epoch: int, batch: list[DelItem]) -> None:
        where = f"delete on node {member.address}"
        request = delete_request(epoch, batch)
        raw = self._control(member, OP_DELETE, request.SerializeToString())
        if raw is not None:
            reply = pb.DeleteReply.FromString(raw)
        else:
            with rpc(where):
                reply = self._conns.get(member.address).delete(
                    request, timeout=self._config.timeout_s
                )
        apply_delete_reply(batch, reply, where)

    def fill(self, member: RingMember, epoch: int, batch: list[FillItem]) -> None:
        # The node answers a fill at once (grant, refusal or release; it never
        # waits), so the connection's timeout bounds it like the item's would.
        for it in batch:
            request = fill_request(epoch, it)
            raw = self._control(member, OP_FILL, request.SerializeToString())
            if raw is not None:
                it.reply = pb.FillReply.FromString(raw)
                continue
            with rpc(f"fill on node {member.address}"):
                it.reply = self._conns.get(member.address).fill(
                    request, timeout=min(self._config.timeout_s, it.timeout_s)
                )

    def fence(self, member: RingMember, epoch: int, timeout_s: float) -> int | None:
        try:
            reply: pb.FenceReply = self._conns.get(member.address).fence(
                pb.FenceRequest(epoch=epoch), timeout=timeout_s
            )
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                return None
            raise from_rpc_error(exc, f"fence node {member.address}") from exc
        return reply.epoch

    def pin(self, member: RingMember, request: pb.PinRequest, timeout_s: float) -> pb.PinReply:
        with rpc(f"pin on node {member.name} ({member.address})"):
            reply: pb.PinReply = self._conns.get(member.address).pin(request, timeout=timeout_s)
        return reply

    def stat(
        self, member: RingMember, timeout_s: float, request: pb.StatRequest | None = None
    ) -> pb.NodeStats:
        with rpc(f"stat of node {member.address}"):
            stats: pb.NodeStats = self._conns.get(member.address).stat(
                request or pb.StatRequest(), timeout=timeout_s
            )
        return stats
