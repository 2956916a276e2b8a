"""The router's gRPC servicer: ring snapshots, membership, invalidations, key events.

Bulk data never passes through here; clients fetch a snapshot and talk to
nodes directly. Every method only adapts proto <-> the membership and the
event hub (router/events.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TypeVar

import grpc

from tensorcache import members
from tensorcache.errors import CapacityExceeded, InvalidArgument, Unavailable
from tensorcache.keys import MAX_KEY_BYTES, MAX_SHARD_KEY_BYTES
from tensorcache.proto import tensorcache_pb2 as pb
from tensorcache.proto import tensorcache_pb2_grpc as pb_grpc
from tensorcache.router.events import DEFAULT_KEEPALIVE_S, EventHub
from tensorcache.router.membership import Membership, MembershipView
from tensorcache.router.relay import Relay

T = TypeVar("T")

MAX_PREFIX_BYTES = MAX_KEY_BYTES
MAX_PUBLISH_EVENTS = 65536


def check_prefix(prefix: str) -> None:
    """An invalidation prefix: any text of at most 1024 UTF-8 bytes, without NUL ("" = all)."""
    try:
        raw = prefix.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidArgument(f"prefix is not valid UTF-8: {exc.reason}") from exc
    if len(raw) > MAX_PREFIX_BYTES:
        raise InvalidArgument(
            f"prefix is {len(raw)} bytes, more than the limit of {MAX_PREFIX_BYTES}"
        )
    if "\0" in prefix:
        raise InvalidArgument("prefix contains a NUL character")


def _invalidations(pairs: tuple[tuple[str, int], ...]) -> list[pb.Invalidation]:
    return [pb.Invalidation(prefix=prefix, epoch=epoch) for prefix, epoch in pairs]


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
        replicas: int = 1,
        hub: EventHub | None = None,
        keepalive_s: float = DEFAULT_KEEPALIVE_S,
    ) -> None:
        if replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {replicas}")
        self._membership = membership
        self._stripe_size = stripe_size
        self._vnodes = vnodes
        self._weight_unit = weight_unit
        self._heartbeat_interval_s = heartbeat_interval_s
        self._ttl_s = ttl_s
        self._replicas = replicas
        self._hub = hub if hub is not None else EventHub()
        #: Forwards nodes' key events to other routers (etcd mode; set once bound).
        self.relay: Relay | None = None
        self._keepalive_s = keepalive_s

    def GetRing(self, request: pb.GetRingRequest, context: grpc.ServicerContext) -> pb.RingSnapshot:
        view = self._membership.view()
        return pb.RingSnapshot(
            epoch=view.epoch,
            members=[members.to_pb(m) for m in view.members],
            stripe_size=self._stripe_size,
            vnodes=self._vnodes,
            weight_unit=self._weight_unit,
            replicas=self._replicas,
            invalidations=_invalidations(view.invalidations),
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

    def Invalidate(
        self, request: pb.InvalidateRequest, context: grpc.ServicerContext
    ) -> pb.InvalidateReply:
        try:
            check_prefix(request.prefix)
        except InvalidArgument as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        epoch = self._call(context, self._membership.invalidate, request.prefix)
        return pb.InvalidateReply(generation=epoch)

    def Publish(self, request: pb.PublishRequest, context: grpc.ServicerContext) -> pb.PublishReply:
        try:
            if len(request.events) > MAX_PUBLISH_EVENTS:
                raise InvalidArgument(
                    f"{len(request.events)} events in one publish; the limit is "
                    f"{MAX_PUBLISH_EVENTS}"
                )
            for i, event in enumerate(request.events):
                if not 0 < len(event.key) <= MAX_SHARD_KEY_BYTES:
                    raise InvalidArgument(
                        f"events[{i}].key is {len(event.key)} bytes; must be "
                        f"1..{MAX_SHARD_KEY_BYTES}"
                    )
        except InvalidArgument as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        self._hub.publish(
            ((event.key, event.version) for event in request.events),
            node=request.node,
            lost=request.lost,
        )
        if self.relay is not None and not request.relayed:
            self.relay.forward(request)
        return pb.PublishReply()

    def Watch(
        self, request: pb.WatchRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.WatchEvent]:
        try:
            watcher = self._hub.subscribe()
        except CapacityExceeded as exc:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except Unavailable as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        # A client that goes away wakes the stream's thread, which then ends.
        context.add_callback(watcher.close)
        try:
            # Subscribed first, then read the view: a record that lands in
            # between comes twice (harmless), never not at all.
            complete = self._complete()
            yield self._reset(complete)
            while context.is_active():
                batch = watcher.next_batch(self._keepalive_s)
                if batch is None:
                    return
                was, complete = complete, self._complete()
                if batch.reset or (complete and not was):
                    # Events may have been missed while incomplete: start over.
                    yield self._reset(complete)
                    continue
                yield pb.WatchEvent(
                    epoch=self._membership.view().epoch,
                    keys=[pb.KeyEvent(key=key, version=version) for key, version in batch.keys],
                    invalidations=_invalidations(batch.invalidations),
                    complete=complete,
                )
        finally:
            self._hub.unsubscribe(watcher)

    def _complete(self) -> bool:
        """Whether this router hears every node of its ring (WatchEvent.complete)."""
        return self._hub.complete(m.name for m in self._membership.view().members)

    def _reset(self, complete: bool) -> pb.WatchEvent:
        view: MembershipView = self._membership.view()
        return pb.WatchEvent(
            epoch=view.epoch,
            invalidations=_invalidations(view.invalidations),
            reset=True,
            complete=complete,
        )

    def Status(
        self, request: pb.RouterStatusRequest, context: grpc.ServicerContext
    ) -> pb.RouterStatus:
        view = self._membership.view()
        status = self._membership.status()
        return pb.RouterStatus(
            state=status.state,
            detail=status.detail,
            epoch=view.epoch,
            members=len(view.members),
            membership=status.where,
            replicas=self._replicas,
        )

    @staticmethod
    def _call(context: grpc.ServicerContext, fn: Callable[..., T], *args: object) -> T:
        """Run a membership call; a store that cannot be reached is UNAVAILABLE."""
        try:
            return fn(*args)
        except Unavailable as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
            raise AssertionError("unreachable") from exc  # abort raises
