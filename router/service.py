"""The router's gRPC servicer: ring snapshots and membership, nothing else.

Bulk data never passes through here; clients fetch a snapshot and talk to
nodes directly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import grpc

from tensorcache.errors import InvalidArgument, Unavailable
from tensorcache.proto import tensorcache_pb2 as pb
from tensorcache.proto import tensorcache_pb2_grpc as pb_grpc
from tensorcache.router import members
from tensorcache.router.membership import Membership

T = TypeVar("T")


class RouterService(pb_grpc.RouterServicer):
    def __init__(
        self,
        membership: Membership,
        *,
        stripe_size: int,
        vnodes: int,
        weight_unit: int,
        heartbeat_interval_s: float,
        ttl_s: float,
    ) -> None:
        self._membership = membership
        self._stripe_size = stripe_size
        self._vnodes = vnodes
        self._weight_unit = weight_unit
        self._heartbeat_interval_s = heartbeat_interval_s
        self._ttl_s = ttl_s

    def GetRing(self, request: pb.GetRingRequest, context: grpc.ServicerContext) -> pb.RingSnapshot:
        view = self._membership.view()
        return pb.RingSnapshot(
            epoch=view.epoch,
            members=[members.to_pb(m) for m in view.members],
            stripe_size=self._stripe_size,
            vnodes=self._vnodes,
            weight_unit=self._weight_unit,
        )

    def Register(
        self, request: pb.RegisterRequest, context: grpc.ServicerContext
    ) -> pb.RegisterReply:
        m = request.member
        try:
            if not m.name or len(m.name) > 253:
                raise InvalidArgument(f"member.name {m.name!r} must be 1..253 characters")
            if not m.address or ":" not in m.address:
                raise InvalidArgument(f"member.address {m.address!r} must be host:port")
            if m.capacity <= 0:
                raise InvalidArgument("member.capacity must be > 0 bytes")
        except InvalidArgument as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        epoch = self._call(context, self._membership.register, members.from_pb(m))
        return pb.RegisterReply(
            epoch=epoch, heartbeat_interval_s=self._heartbeat_interval_s, ttl_s=self._ttl_s
        )

    def Heartbeat(
        self, request: pb.HeartbeatRequest, context: grpc.ServicerContext
    ) -> pb.HeartbeatReply:
        epoch, known = self._call(context, self._membership.heartbeat, request.name)
        return pb.HeartbeatReply(epoch=epoch, known=known)

    def Deregister(
        self, request: pb.DeregisterRequest, context: grpc.ServicerContext
    ) -> pb.DeregisterReply:
        return pb.DeregisterReply(
            epoch=self._call(context, self._membership.deregister, request.name)
        )

    @staticmethod
    def _call(context: grpc.ServicerContext, fn: Callable[..., T], *args: object) -> T:
        """Run a membership call; a store that cannot be reached is UNAVAILABLE."""
        try:
            return fn(*args)
        except Unavailable as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
            raise AssertionError("unreachable") from exc  # abort raises
