"""The router's gRPC servicer: ring snapshots, membership, invalidations, key events.

Bulk data never passes through here; clients fetch a snapshot and talk to
nodes directly. Every method only adapts proto <-> the membership and the
event hub (router/events.py).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence

import grpc

from tensorcache import wire
from tensorcache.errors import InvalidArgument, TensorCacheError, status_code
from tensorcache.keys import MAX_KEY_BYTES, MAX_SHARD_KEY_BYTES
from tensorcache.proto import tensorcache_pb2 as pb
from tensorcache.proto import tensorcache_pb2_grpc as pb_grpc
from tensorcache.router.events import DEFAULT_KEEPALIVE_S, EventHub
from tensorcache.router.membership import Membership, MembershipView
from tensorcache.router.relay import Relay

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


@contextlib.contextmanager
def _status_on_error(context: grpc.ServicerContext) -> Iterator[None]:
    """End the call with the status ``errors.py`` maps a ``TensorCacheError`` to.

    The router's one error mapping: its checks raise ``InvalidArgument``, a
    membership store that cannot be reached raises ``Unavailable``, a full
    event hub ``CapacityExceeded`` (``abort`` raises, ending the call).
    """
    try:
        yield
    except TensorCacheError as exc:
        context.abort(status_code(exc), str(exc))


def _check_member(m: pb.Member) -> None:
    if not m.name or len(m.name) > 253:
        raise InvalidArgument(f"member.name {m.name!r} must be 1..253 characters")
    if not m.address or ":" not in m.address:
        raise InvalidArgument(f"member.address {m.address!r} must be host:port")
    if m.capacity <= 0:
        raise InvalidArgument("member.capacity must be > 0 bytes")


def _check_events(events: Sequence[pb.KeyEvent]) -> None:
    if len(events) > MAX_PUBLISH_EVENTS:
        raise InvalidArgument(
            f"{len(events)} events in one publish; the limit is {MAX_PUBLISH_EVENTS}"
        )
    for i, event in enumerate(events):
        if not 0 < len(event.key) <= MAX_SHARD_KEY_BYTES:
            raise InvalidArgument(
                f"events[{i}].key is {len(event.key)} bytes; must be 1..{MAX_SHARD_KEY_BYTES}"
            )


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
        snap = pb.RingSnapshot(
            epoch=view.epoch,
            members=[wire.to_pb(m) for m in view.members],
            stripe_size=self._stripe_size,
            vnodes=self._vnodes,
            weight_unit=self._weight_unit,
            replicas=self._replicas,
            invalidations=_invalidations(view.invalidations),
        )
        if request.earlier:
            now = time.monotonic()
            snap.earlier.extend(
                pb.PastPlacement(
                    epoch=p.epoch,
                    members=[wire.to_pb(m) for m in p.members],
                    ended_ms_ago=max(0, round((now - p.ended) * 1000)),
                )
                for p in view.earlier
            )
        return snap

    def Register(
        self, request: pb.RegisterRequest, context: grpc.ServicerContext
    ) -> pb.RegisterReply:
        with _status_on_error(context):
            _check_member(request.member)
            epoch = self._membership.register(wire.from_pb(request.member))
        return pb.RegisterReply(
            epoch=epoch, heartbeat_interval_s=self._heartbeat_interval_s, ttl_s=self._ttl_s
        )

    def Heartbeat(
        self, request: pb.HeartbeatRequest, context: grpc.ServicerContext
    ) -> pb.HeartbeatReply:
        with _status_on_error(context):
            epoch, known = self._membership.heartbeat(request.name)
        return pb.HeartbeatReply(epoch=epoch, known=known)

    def Deregister(
        self, request: pb.DeregisterRequest, context: grpc.ServicerContext
    ) -> pb.DeregisterReply:
        with _status_on_error(context):
            epoch = self._membership.deregister(request.name)
        return pb.DeregisterReply(epoch=epoch)

    def Invalidate(
        self, request: pb.InvalidateRequest, context: grpc.ServicerContext
    ) -> pb.InvalidateReply:
        with _status_on_error(context):
            check_prefix(request.prefix)
            epoch = self._membership.invalidate(request.prefix)
        return pb.InvalidateReply(generation=epoch)

    def Publish(self, request: pb.PublishRequest, context: grpc.ServicerContext) -> pb.PublishReply:
        with _status_on_error(context):
            _check_events(request.events)
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
        with _status_on_error(context):
            watcher = self._hub.subscribe()
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
