"""The node's gRPC servicer: adapts the wire contract to NodeOps.

Put and Get are raw byte streams (see proto/tensorcache.proto): message 0 is
a serialized header we parse ourselves, so a malformed one gets
INVALID_ARGUMENT naming the problem instead of a generic deserialization
error; the remaining messages are payload bytes that are never copied into
a protobuf message. The TCP data channel (dataserver.py) is the fast path;
this one is the portable fallback and the home of Stat, Fence and Pin
(Delete and Fill go over the data channel too when a client has one open).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from typing import NoReturn

import grpc

from tensorcache.errors import (
    EPOCH_METADATA_KEY,
    Cancelled,
    InvalidArgument,
    StaleEpoch,
    TensorCacheError,
    status_code,
)
from tensorcache.grpcutil import NODE_SERVICE
from tensorcache.node.hot import hot_keys
from tensorcache.node.metrics import NoMetrics, Transfers, request_op
from tensorcache.node.ops import NodeOps, PutPlan
from tensorcache.node.payload import payload_chunks, split_payload
from tensorcache.node.validate import parse_header
from tensorcache.proto import tensorcache_pb2 as pb

log = logging.getLogger("tensorcache.node")

SERVICE = NODE_SERVICE


class NodeService:
    """Thin adapter between gRPC and NodeOps."""

    def __init__(self, ops: NodeOps, metrics: Transfers | None = None) -> None:
        self._ops = ops
        self._metrics: Transfers = metrics if metrics is not None else NoMetrics()

    @staticmethod
    def _abort(context: grpc.ServicerContext, exc: TensorCacheError) -> NoReturn:
        if isinstance(exc, StaleEpoch):
            context.set_trailing_metadata(((EPOCH_METADATA_KEY, str(exc.epoch)),))
        context.abort(status_code(exc), str(exc))
        raise AssertionError("unreachable")  # context.abort raises

    def put(self, request_iterator: Iterable[bytes], context: grpc.ServicerContext) -> bytes:
        start = time.perf_counter()
        status = "CANCELLED"  # unless it ends otherwise: the stream broke
        messages = iter(request_iterator)
        plan: PutPlan | None = None
        try:
            try:
                plan = self._ops.plan_put(parse_header(pb.PutRequest, next(messages, None), "put"))
                chunks, crcs = split_payload(messages, plan.sizes)
            except grpc.RpcError as exc:  # the client cancelled or died mid-stream
                raise Cancelled("put: client went away mid-stream") from exc
            except InvalidArgument:
                if not context.is_active():
                    raise Cancelled("put: client went away mid-stream") from None
                raise
            reply = self._ops.finish_put(plan, chunks, crcs).SerializeToString()
            status = "OK"
            return reply
        except TensorCacheError as exc:
            status = status_code(exc).name
            self._abort(context, exc)
        finally:
            if plan is not None:
                self._ops.abort_put(plan)
            received = plan.total if plan is not None and status == "OK" else 0
            self._metrics.done("put", "grpc", status, time.perf_counter() - start, received, 0, 0)

    def get(self, raw: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        start = time.perf_counter()
        op = "get"
        try:
            req: pb.GetRequest = parse_header(pb.GetRequest, raw, "get")
            op = request_op(req)
            reply, entries, _ = self._ops.get(req)  # no pinning on gRPC: never local
        except TensorCacheError as exc:
            self._metrics.done(
                op, "grpc", status_code(exc).name, time.perf_counter() - start, 0, 0, 0
            )
            self._abort(context, exc)
        status, sent = "CANCELLED", 0  # unless the stream ends: the client went away
        try:
            yield reply.SerializeToString()
            if not req.head_only:
                for chunk in payload_chunks(entries):
                    sent += len(chunk)
                    yield chunk if isinstance(chunk, bytes) else bytes(chunk)
            status = "OK"
        finally:
            self._metrics.done(op, "grpc", status, time.perf_counter() - start, 0, sent, 0)

    def delete(self, raw: bytes, context: grpc.ServicerContext) -> bytes:
        start = time.perf_counter()
        try:
            req = parse_header(pb.DeleteRequest, raw, "delete")
            reply = self._ops.delete(req).SerializeToString()
        except TensorCacheError as exc:
            self._done_control("delete", start, status_code(exc).name)
            self._abort(context, exc)
        self._done_control("delete", start, "OK")
        return reply

    def fill(self, raw: bytes, context: grpc.ServicerContext) -> bytes:
        start = time.perf_counter()
        try:
            reply = self._ops.fill(parse_header(pb.FillRequest, raw, "fill")).SerializeToString()
        except TensorCacheError as exc:
            self._done_control("fill", start, status_code(exc).name)
            self._abort(context, exc)
        self._done_control("fill", start, "OK")
        return reply

    def _done_control(self, op: str, start: float, status: str) -> None:
        """Deletes and fills are recorded like gets and puts (the data channel serves them too)."""
        self._metrics.done(op, "grpc", status, time.perf_counter() - start, 0, 0, 0)

    def fence(self, raw: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            return self._ops.fence(parse_header(pb.FenceRequest, raw, "fence")).SerializeToString()
        except TensorCacheError as exc:
            self._abort(context, exc)

    def pin(self, raw: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            return self._ops.pin(parse_header(pb.PinRequest, raw, "pin")).SerializeToString()
        except TensorCacheError as exc:
            self._abort(context, exc)

    def stat(self, raw: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            req = parse_header(pb.StatRequest, raw, "stat")
        except TensorCacheError as exc:
            self._abort(context, exc)
        reply = self._ops.stat()
        if req.hot_keys:
            hot_keys(self._ops.store, req.hot_keys, reply)
        return reply.SerializeToString()

    def handler(self) -> grpc.GenericRpcHandler:
        """The generic handler: identity (de)serializers on the raw streams."""
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Put": grpc.stream_unary_rpc_method_handler(self.put),
                "Get": grpc.unary_stream_rpc_method_handler(self.get),
                # Typed in the proto, parsed here too, so that garbage gets
                # INVALID_ARGUMENT naming the problem rather than INTERNAL.
                "Delete": grpc.unary_unary_rpc_method_handler(self.delete),
                "Stat": grpc.unary_unary_rpc_method_handler(self.stat),
                "Fill": grpc.unary_unary_rpc_method_handler(self.fill),
                "Fence": grpc.unary_unary_rpc_method_handler(self.fence),
                "Pin": grpc.unary_unary_rpc_method_handler(self.pin),
            },
        )
