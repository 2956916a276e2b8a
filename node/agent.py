"""The node's membership agent: register with the router, then heartbeat.

Runs on one daemon thread. A failed call is logged and counted, never
fatal: the node keeps serving its data while the router is unreachable, and
registers again as soon as the router answers that it does not know it
(a router restart, or a lease that expired while the node was paused).

Ring changes: the agent fetches the new ring and hands it to ``on_ring``
*before* it publishes the new epoch in the node's EpochView, so a request
admitted at an epoch is always judged by a ring at least that new
(ownership, invalidations). Before registering, it fetches the ring the
node is joining, so a new node knows who held its keys before it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import grpc

from tensorcache.authgrpc import NO_CREDENTIALS, Credentials
from tensorcache.grpcutil import CHANNEL_OPTIONS
from tensorcache.node.lease import LeaseGuard
from tensorcache.node.ops import EpochView
from tensorcache.node.rings import Earlier
from tensorcache.proto import tensorcache_pb2 as pb
from tensorcache.proto import tensorcache_pb2_grpc as pb_grpc
from tensorcache.ring import Ring
from tensorcache.wire import earlier_from_snapshot, ring_from_snapshot

log = logging.getLogger("tensorcache.node")


class MembershipAgent:
    def __init__(
        self,
        router: str,
        member: pb.Member,
        epochs: EpochView,
        on_ring: Callable[[Ring, Earlier], None] | None = None,
        on_forgotten: Callable[[], None] | None = None,
        creds: Credentials = NO_CREDENTIALS,
        lease: LeaseGuard | None = None,
    ) -> None:
        """``on_forgotten``: called when the router no longer knows this node
        (its lease expired: a pause, a partition), before it registers again.
        ``lease``: told when each heartbeat cycle starts and ends, so the data
        path holds requests after a stall until a heartbeat has run (node/lease.py)."""
        self.lease = lease if lease is not None else LeaseGuard(3.0)
        self._on_forgotten = on_forgotten
        self._member = member
        self._epochs = epochs
        self._on_ring = on_ring
        self._channel = creds.channel(router, CHANNEL_OPTIONS)
        self._stub = pb_grpc.RouterStub(self._channel)
        self._router = router
        self._stop = threading.Event()
        self._registered = threading.Event()
        self._ring_lock = threading.Lock()  # one ring install at a time
        self._interval = 1.0
        self._ttl = 3.0  # the router's lease (RegisterReply.ttl_s)
        self._thread = threading.Thread(target=self._loop, name="membership-agent", daemon=True)
        self._ticker = threading.Thread(
            target=self.lease.run_ticker, args=(self._stop,), name="lease-ticker", daemon=True
        )

    def start(self) -> None:
        self._thread.start()
        self._ticker.start()

    def wait_registered(self, timeout: float) -> bool:
        return self._registered.wait(timeout)

    def _set_epoch(self, epoch: int) -> None:
        """Adopt ``epoch``: on a change, install the new ring, then publish its epoch."""
        if epoch <= self._epochs.epoch:
            return
        if self._on_ring is None:
            self._epochs.update(epoch)
            return
        self._install(*self._fetch_ring())

    def _fetch_ring(self) -> tuple[Ring, Earlier]:
        """The router's ring, and the placements it remembers before it."""
        snap = self._stub.GetRing(pb.GetRingRequest(earlier=True), timeout=5)
        return ring_from_snapshot(snap), earlier_from_snapshot(snap)

    def _install(self, ring: Ring, earlier: Earlier = ()) -> None:
        with self._ring_lock:
            if self._on_ring is not None:
                self._on_ring(ring, earlier)
            self._epochs.update(ring.epoch)

    def sync(self, epoch: int, timeout: float = 2.0) -> None:
        """Fence: poll the router until its ring reaches ``epoch`` (bounded), and adopt it."""
        deadline = time.monotonic() + timeout
        while self._epochs.epoch < epoch:
            try:
                ring, earlier = self._fetch_ring()
                if ring.epoch > self._epochs.epoch:
                    self._install(ring, earlier)
            except grpc.RpcError as exc:
                log.warning(
                    "fence to epoch %d: router %s unreachable: %s", epoch, self._router, exc
                )
            except ValueError:  # the channel is closed: the node is stopping
                return
            if self._epochs.epoch >= epoch or time.monotonic() >= deadline:
                break
            time.sleep(0.02)

    def _register(self) -> None:
        reply = self._stub.Register(pb.RegisterRequest(member=self._member), timeout=5)
        self._interval = reply.heartbeat_interval_s or 1.0
        self._ttl = reply.ttl_s or self._ttl
        self.lease.ttl_s = self._ttl
        self._set_epoch(reply.epoch)
        if not self._registered.is_set():
            log.info("registered with router %s at epoch %d", self._router, reply.epoch)
        self._registered.set()

    def _loop(self) -> None:
        backoff = 0.1
        joining = self._on_ring is not None
        while not self._stop.is_set():
            started = self.lease.cycle_started()
            renewed = False
            try:
                if joining:  # the ring before us: who held our keys until now
                    self._install(*self._fetch_ring())
                    joining = False
                if not self._registered.is_set():
                    self._register()
                    renewed = True
                else:
                    reply = self._stub.Heartbeat(
                        pb.HeartbeatRequest(name=self._member.name), timeout=5
                    )
                    # Since the start of the last call the router answered: a
                    # call that began before a pause and was answered after
                    # it says nothing about the pause.
                    silent = self.lease.silent_s()
                    if reply.known:
                        self._set_epoch(reply.epoch)
                        renewed = True
                    else:
                        log.warning("router %s forgot this node; registering again", self._router)
                        # Unheard of for a whole lease (paused, cut off): the
                        # ring went on without us. A router that restarted
                        # and forgot everyone while we kept in touch is not that.
                        if silent >= self._ttl and self._on_forgotten is not None:
                            log.warning(
                                "no answer from the router for %.1fs (lease %.1fs): "
                                "every entry held is suspect until judged again",
                                silent,
                                self._ttl,
                            )
                            self._on_forgotten()
                        self._register()
                        renewed = True
                self.lease.cycle_done(started, renewed=renewed)
                backoff = 0.1
                self._stop.wait(self._interval)
            except grpc.RpcError as exc:
                log.warning(
                    "router %s unreachable (%s); retrying in %.1fs",
                    self._router,
                    exc.code() if hasattr(exc, "code") else exc,
                    backoff,
                )
                # Unreachable is an answer too: the node keeps serving (node/lease.py).
                self.lease.cycle_done(started, renewed=renewed)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self._interval)

    def stop(self, deregister: bool = True) -> Ring | None:
        """Stop heartbeating; leave the ring first so clients stop sending here.

        Returns the ring after leaving (installed, its epoch published): where
        this node's entries live now. None if it could not be had.
        """
        ring = None
        if deregister:
            ring = self.leave()
        else:
            self._halt()
        self.close()
        return ring

    def _halt(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def leave(self) -> Ring | None:
        """Stop heartbeating and deregister; the channel stays open for ``latest``."""
        self._halt()
        if not self._registered.is_set():
            return None
        try:
            self._stub.Deregister(pb.DeregisterRequest(name=self._member.name), timeout=2)
        except grpc.RpcError as exc:
            log.warning("could not deregister from %s: %s", self._router, exc)
            return None
        return self.latest()

    def latest(self) -> Ring | None:
        """The router's ring now, installed (a draining node follows others leaving)."""
        try:
            ring, earlier = self._fetch_ring()
        except (grpc.RpcError, ValueError) as exc:
            log.warning("could not fetch the ring from %s: %s", self._router, exc)
            return None
        if ring.epoch > self._epochs.epoch:
            self._install(ring, earlier)
        return ring

    def close(self) -> None:
        self._channel.close()
