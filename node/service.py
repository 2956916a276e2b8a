"""The node's gRPC servicer: adapts the wire contract to the Store.

Put and Get are raw byte streams (see proto/tensorcache.proto): message 0 is
a serialized header we parse ourselves, so a malformed one gets
INVALID_ARGUMENT naming the problem instead of a generic deserialization
error; the remaining messages are payload bytes that are never copied into
a protobuf message. Every bad input is answered with a precise status and
leaves the store untouched.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError

from tensorcache import codec
from tensorcache.errors import EPOCH_METADATA_KEY, CapacityExceeded, InvalidArgument
from tensorcache.keys import MAX_KEY_BYTES, MAX_SHARD_KEY_BYTES, check_key_bytes
from tensorcache.node.store import NewEntry, Store, StoreKey, entry_cost
from tensorcache.proto import tensorcache_pb2 as pb

log = logging.getLogger("tensorcache.node")

SERVICE = "tensorcache.v1.Node"
MAX_BATCH_ENTRIES = 65536
# Payload chunks smaller than this are coalesced into one message on Get.
COALESCE_BELOW = 256 * 1024


class EpochView:
    """The newest ring epoch this node has heard of (from router heartbeats)."""

    def __init__(self) -> None:
        self._epoch = 0
        self._lock = threading.Lock()

    @property
    def epoch(self) -> int:
        return self._epoch

    def update(self, epoch: int) -> None:
        with self._lock:
            self._epoch = epoch


@dataclass(frozen=True)
class _Abort(Exception):
    code: grpc.StatusCode
    message: str
    trailers: tuple[tuple[str, str], ...] = ()


def _parse(message_type: type, raw: bytes | None, what: str):  # type: ignore[no-untyped-def]
    if raw is None:
        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"{what}: the stream carried no header")
    try:
        return message_type.FromString(raw)
    except DecodeError as exc:
        raise _Abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{what}: header of {len(raw)} bytes is not a valid {message_type.__name__}: {exc}",
        ) from exc


def _store_key(raw: bytes, kind: int, where: str) -> StoreKey:
    if kind not in (pb.TENSOR, pb.SHARD):
        raise InvalidArgument(f"{where}.kind {kind} is not a known EntryKind")
    limit = MAX_KEY_BYTES if kind == pb.TENSOR else MAX_SHARD_KEY_BYTES
    return (kind, check_key_bytes(raw, limit=limit, field=f"{where}.key"))


def _check_meta(meta: pb.TensorMeta, kind: int, where: str) -> int:
    """Validate a put's metadata; return the payload bytes the entry carries."""
    codec.check_layout(meta.dtype, list(meta.shape), meta.order, meta.nbytes)
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


class NodeService:
    """Thin adapter between gRPC and the Store (no placement logic here)."""

    def __init__(self, store: Store, name: str, address: str, epochs: EpochView) -> None:
        self._store = store
        self._name = name
        self._address = address
        self._epochs = epochs

    # -- helpers --------------------------------------------------------------
    def _check_epoch(self, epoch: int) -> None:
        # 0 means "not placed with a ring" (admin tools); a newer client epoch
        # means this node has not heard of it yet, which is harmless.
        current = self._epochs.epoch
        if epoch and epoch < current:
            raise _Abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"stale epoch {epoch}: node {self._name} is at epoch {current}; refresh the ring",
                ((EPOCH_METADATA_KEY, str(current)),),
            )

    @staticmethod
    def _abort(context: grpc.ServicerContext, exc: Exception) -> None:
        """The one place node errors become gRPC statuses (context.abort raises)."""
        if isinstance(exc, _Abort):
            if exc.trailers:
                context.set_trailing_metadata(exc.trailers)
            context.abort(exc.code, exc.message)
        if isinstance(exc, InvalidArgument):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if isinstance(exc, CapacityExceeded):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        if isinstance(exc, grpc.RpcError):  # the client cancelled or went away mid-stream
            context.abort(grpc.StatusCode.CANCELLED, "client cancelled the call")
        raise exc

    def _run(self, context: grpc.ServicerContext, fn: Callable[[], object]) -> object:
        try:
            return fn()
        except (_Abort, InvalidArgument, CapacityExceeded, grpc.RpcError) as exc:
            self._abort(context, exc)
        raise AssertionError("unreachable")  # _abort raises

    # -- Put ------------------------------------------------------------------
    def put(self, request_iterator: Iterable[bytes], context: grpc.ServicerContext) -> bytes:
        return self._run(context, lambda: self._put(iter(request_iterator), context))  # type: ignore[return-value]

    def _put(self, messages: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        req: pb.PutRequest = _parse(pb.PutRequest, next(messages, None), "put")
        if not req.entries:
            raise InvalidArgument("put: entries is empty")
        if len(req.entries) > MAX_BATCH_ENTRIES:
            raise InvalidArgument(f"put: {len(req.entries)} entries, more than {MAX_BATCH_ENTRIES}")
        self._check_epoch(req.epoch)
        keys: list[StoreKey] = []
        sizes: list[int] = []
        costs: list[int] = []
        for i, e in enumerate(req.entries):
            where = f"entries[{i}]"
            key = _store_key(e.key, e.kind, where)
            size = _check_meta(e.meta, e.kind, where)
            keys.append(key)
            sizes.append(size)
            costs.append(entry_cost(key[1], size, e.meta.ByteSize()))
        reservation = self._store.reserve(sum(costs))
        try:
            chunks = self._receive(messages, sizes, req, context)
            items = [
                NewEntry(k, e.meta, c, cost)
                for k, e, c, cost in zip(keys, req.entries, chunks, costs, strict=True)
            ]
            results = self._store.commit(reservation, items)
        finally:
            self._store.release(reservation)  # no-op after a commit
        reply = pb.PutReply(epoch=self._epochs.epoch)
        for e, (version, old) in zip(req.entries, results, strict=True):
            r = reply.results.add(key=e.key, version=version)
            if old is not None and old.meta.stripes:
                r.replaced_stripes.extend(old.meta.stripes)
        return reply.SerializeToString()

    def _receive(
        self,
        messages: Iterator[bytes],
        sizes: list[int],
        req: pb.PutRequest,
        context: grpc.ServicerContext,
    ) -> list[tuple[bytes, ...]]:
        """Split the payload stream into per-entry chunk lists, checking sizes and CRCs."""
        total = sum(sizes)
        out: list[list[bytes]] = [[] for _ in sizes]
        crcs = [0] * len(sizes)
        idx, need, received = 0, sizes[0] if sizes else 0, 0
        for msg in messages:
            if received + len(msg) > total:
                raise InvalidArgument(f"put: payload exceeds the {total} bytes the header declares")
            received += len(msg)
            pos = 0
            while pos < len(msg):
                while need == 0:
                    idx += 1
                    need = sizes[idx]
                take = min(need, len(msg) - pos)
                piece = msg if (pos == 0 and take == len(msg)) else msg[pos : pos + take]
                out[idx].append(piece)
                crcs[idx] = codec.crc32c(piece, crcs[idx])
                pos += take
                need -= take
        if received != total:
            if context.is_active():
                raise InvalidArgument(
                    f"put: payload ended after {received} bytes, the header declares {total}"
                )
            raise _Abort(grpc.StatusCode.CANCELLED, "put: client went away mid-stream")
        for i, e in enumerate(req.entries):
            if sizes[i] and crcs[i] != e.meta.crc32c:
                raise _Abort(
                    grpc.StatusCode.DATA_LOSS,
                    f"put: checksum mismatch for entries[{i}] ({e.key[:64]!r}): "
                    f"received crc32c {crcs[i]:#010x}, header says {e.meta.crc32c:#010x}",
                )
            if not sizes[i] and not e.meta.stripes and e.meta.crc32c != 0:
                raise _Abort(
                    grpc.StatusCode.DATA_LOSS,
                    f"put: entries[{i}] is empty but declares crc32c {e.meta.crc32c:#010x}",
                )
        return [tuple(c) for c in out]

    # -- Get ------------------------------------------------------------------
    def get(self, raw: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        try:
            req: pb.GetRequest = _parse(pb.GetRequest, raw, "get")
            if len(req.keys) > MAX_BATCH_ENTRIES:
                raise InvalidArgument(f"get: {len(req.keys)} keys, more than {MAX_BATCH_ENTRIES}")
            self._check_epoch(req.epoch)
            keys = [_store_key(k.key, k.kind, f"keys[{i}]") for i, k in enumerate(req.keys)]
        except (_Abort, InvalidArgument) as exc:
            self._abort(context, exc)
            return
        entries = [self._store.get(k) for k in keys]
        reply = pb.GetReply(epoch=self._epochs.epoch)
        for k, entry in zip(req.keys, entries, strict=True):
            got = reply.entries.add(key=k.key, found=entry is not None)
            if entry is not None:
                got.version = entry.version
                got.meta.CopyFrom(entry.meta)
        yield reply.SerializeToString()
        if req.head_only:
            return
        pending: list[bytes] = []
        pending_bytes = 0
        for entry in entries:
            if entry is None:
                continue
            for chunk in entry.chunks:
                if len(chunk) >= COALESCE_BELOW:
                    if pending:
                        yield b"".join(pending)
                        pending, pending_bytes = [], 0
                    yield chunk
                else:
                    pending.append(chunk)
                    pending_bytes += len(chunk)
                    if pending_bytes >= COALESCE_BELOW:
                        yield b"".join(pending)
                        pending, pending_bytes = [], 0
        if pending:
            yield b"".join(pending)

    # -- Delete / Stat ----------------------------------------------------------
    def delete(self, req: pb.DeleteRequest, context: grpc.ServicerContext) -> pb.DeleteReply:
        def run() -> pb.DeleteReply:
            self._check_epoch(req.epoch)
            keys = [_store_key(k.key, k.kind, f"keys[{i}]") for i, k in enumerate(req.keys)]
            reply = pb.DeleteReply(epoch=self._epochs.epoch)
            for k, key in zip(req.keys, keys, strict=True):
                old = self._store.delete(key)
                r = reply.results.add(key=k.key, found=old is not None)
                if old is not None:
                    r.stripes.extend(old.meta.stripes)
            return reply

        return self._run(context, run)  # type: ignore[return-value]

    def stat(self, req: pb.StatRequest, context: grpc.ServicerContext) -> pb.NodeStats:
        s = self._store.stats()
        return pb.NodeStats(
            name=self._name,
            address=self._address,
            keys=s.entries_by_kind.get(pb.TENSOR, 0),
            shards=s.entries_by_kind.get(pb.SHARD, 0),
            bytes_used=s.bytes_used,
            bytes_reserved=s.bytes_reserved,
            capacity=s.capacity,
            hits=s.hits,
            misses=s.misses,
            evictions=s.evictions,
            puts=s.puts,
            deletes=s.deletes,
            policy=s.policy,
            epoch=self._epochs.epoch,
        )

    def handler(self) -> grpc.GenericRpcHandler:
        """The generic handler: identity (de)serializers on the raw streams."""
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Put": grpc.stream_unary_rpc_method_handler(self.put),
                "Get": grpc.unary_stream_rpc_method_handler(self.get),
                "Delete": grpc.unary_unary_rpc_method_handler(
                    self.delete,
                    request_deserializer=pb.DeleteRequest.FromString,
                    response_serializer=pb.DeleteReply.SerializeToString,
                ),
                "Stat": grpc.unary_unary_rpc_method_handler(
                    self.stat,
                    request_deserializer=pb.StatRequest.FromString,
                    response_serializer=pb.NodeStats.SerializeToString,
                ),
            },
        )
