"""Router-to-router relay of key events, so watch mode works with several routers.

A node publishes its key events to the one router it registered with; a
watch-mode client may be connected to another. With membership in etcd,
every router announces itself under ``<prefix>-routers/<address>`` (a key
on a lease, kept alive by the router) and forwards every Publish it gets
from a node, keepalives included, to every other announced router, marked
``relayed`` so it goes no further.

What makes this safe needs no ordering between routers: a router's stream
is ``complete`` only while it hears (directly or relayed) from every node of
its ring within 3 s (router/events.py). A router that just started is not
yet known to its peers, so it hears from nobody, says incomplete, and its
watchers stay strict until relays arrive (then it resets them). A relay
that fails marks the next one to that peer ``lost`` (the peer resets its
watchers), and a peer that stays unreachable stops hearing keepalives and
goes incomplete by itself.

Per peer: one thread, one bounded queue (overflow drops the queue and
marks the next send ``lost``), batches of what is queued.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence

import grpc

from tensorcache.authgrpc import NO_CREDENTIALS, Credentials
from tensorcache.errors import TensorCacheError
from tensorcache.grpcutil import CHANNEL_OPTIONS
from tensorcache.proto import tensorcache_pb2 as pb
from tensorcache.proto import tensorcache_pb2_grpc as pb_grpc

log = logging.getLogger("tensorcache.router")

PEERS_EVERY_S = 1.0  # how often the announced routers are read (and our lease kept)
MAX_QUEUED = 65536  # events per peer
SEND_TIMEOUT_S = 2.0


class _Peer:
    def __init__(self, address: str, creds: Credentials = NO_CREDENTIALS) -> None:
        self.address = address
        self._channel = creds.channel(address, CHANNEL_OPTIONS)
        self._stub = pb_grpc.RouterStub(self._channel)
        self._queue: deque[pb.PublishRequest] = deque()
        self._queued_events = 0
        self._lost = False
        self._cond = threading.Condition()
        self._stop = False
        self._failing = False
        self.sent = 0
        self._thread = threading.Thread(target=self._loop, name=f"relay-{address}", daemon=True)
        self._thread.start()

    def put(self, request: pb.PublishRequest) -> None:
        with self._cond:
            if self._queued_events + len(request.events) > MAX_QUEUED:
                self._queue.clear()
                self._queued_events = 0
                self._lost = True
            self._queue.append(request)
            self._queued_events += len(request.events)
            self._cond.notify()

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stop or bool(self._queue))
                if self._stop:
                    return
                batch = list(self._queue)
                self._queue.clear()
                self._queued_events = 0
                lost, self._lost = self._lost, False
            for i, request in enumerate(batch):
                out = pb.PublishRequest(
                    node=request.node,
                    events=request.events,
                    lost=request.lost or (lost and i == 0),
                    relayed=True,
                )
                try:
                    self._stub.Publish(out, timeout=SEND_TIMEOUT_S)
                    self.sent += 1
                    if self._failing:
                        log.info("relaying key events to router %s again", self.address)
                        self._failing = False
                except grpc.RpcError as exc:
                    with self._cond:
                        self._lost = True  # the peer resets its watchers when we are back
                    if not self._failing:
                        code = exc.code() if hasattr(exc, "code") else exc
                        log.warning(
                            "relaying key events to router %s failed: %s", self.address, code
                        )
                        self._failing = True
                    break  # drop the rest of this batch; lost covers it

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout=SEND_TIMEOUT_S + 1)
        self._channel.close()


class Relay:
    """Forwards nodes' Publish calls to every other announced router."""

    def __init__(
        self,
        me: str,
        peers: Callable[[], Sequence[str]],
        keep_announced: Callable[[], None],
        *,
        every_s: float = PEERS_EVERY_S,
        creds: Credentials = NO_CREDENTIALS,
    ) -> None:
        self.me = me
        self._creds = creds
        self._list_peers = peers
        self._keep = keep_announced
        self._every_s = every_s
        self._peers: dict[str, _Peer] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="relay-peers", daemon=True)
        self._thread.start()

    @property
    def peers(self) -> list[str]:
        with self._lock:
            return sorted(self._peers)

    def forward(self, request: pb.PublishRequest) -> None:
        with self._lock:
            peers = list(self._peers.values())
        for peer in peers:
            peer.put(request)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._keep()
                wanted = {a for a in self._list_peers() if a != self.me}
                self._update(wanted)
            except TensorCacheError as exc:  # etcd away: keep the peers we know
                log.debug("relay: cannot read the announced routers: %s", exc)
            except Exception:
                log.exception("relay: peer refresh failed")
            self._stop.wait(self._every_s)

    def _update(self, wanted: set[str]) -> None:
        with self._lock:
            gone = [self._peers.pop(a) for a in list(self._peers) if a not in wanted]
            for address in wanted - set(self._peers):
                log.info("relaying key events to router %s", address)
                self._peers[address] = _Peer(address, self._creds)
        for peer in gone:
            log.info("router %s is gone; no more relaying to it", peer.address)
            peer.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        with self._lock:
            peers = list(self._peers.values())
            self._peers.clear()
        for peer in peers:
            peer.close()
