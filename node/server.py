"""Node process: config, ``create_server`` and the ``tensorcache node`` entry."""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import signal
import socket
import threading
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2

from tensorcache import localread, tls
from tensorcache.auth import TOKEN_ENV
from tensorcache.authgrpc import Credentials, PolicyFile
from tensorcache.grpcutil import SERVER_OPTIONS, add_health, bind, health_server
from tensorcache.metrics import Exporter
from tensorcache.node import authz, tickets
from tensorcache.node.agent import MembershipAgent
from tensorcache.node.dataserver import DataServer
from tensorcache.node.events import MIN_GAP_S, EventPublisher, NoEvents
from tensorcache.node.metrics import NodeCollector, NodeMetrics
from tensorcache.node.ops import EpochView, NodeOps
from tensorcache.node.pace import PaceConfig
from tensorcache.node.peers import GrpcPeers
from tensorcache.node.policy import POLICIES
from tensorcache.node.recvpool import RecvPool
from tensorcache.node.rings import Earlier, RingView
from tensorcache.node.service import SERVICE, NodeService
from tensorcache.node.store import Store
from tensorcache.node.tiered import TieredStore
from tensorcache.proto import tensorcache_pb2 as pb
from tensorcache.ring import Ring
from tensorcache.sizes import parse_size
from tensorcache.tickets import TicketBook
from tensorcache.tls import ReloadingContext, TLSFiles

log = logging.getLogger("tensorcache.node")


@dataclass(frozen=True)
class NodeConfig:
    """One cache node's settings."""

    #: Stable identity the ring hashes on (a pod name); never an address.
    name: str
    #: Router to register with (host:port); None runs the node standalone.
    router: str | None = None
    host: str = "127.0.0.1"
    port: int = 0
    #: Strict byte budget for stored entries and puts in flight.
    capacity: int = 4 * 1024**3
    #: Eviction policy: lru, lfu or fifo.
    policy: str = "lru"
    #: Bytes of the budget that pinned entries (never evicted) may hold
    #: (node/pins.py); None: half of ``capacity``; 0: pins are refused.
    pinned_capacity: int | None = None
    #: Bytes of put receive buffers kept for reuse (node/recvpool.py: no page
    #: faults on reused memory); None: min(capacity / 2, 4 GiB); 0: off.
    #: Free blocks are outside the byte budget: RSS can reach capacity + this.
    recv_pool: int | None = None
    #: Host to advertise to clients (default: host); ports are the bound ones.
    advertise: str | None = None
    #: TCP data channel port (0: any free port; None: no data channel, gRPC only).
    data_port: int | None = 0
    #: Let clients on this host copy entries straight out of this process
    #: with process_vm_readv (tensorcache/localread.py). Needs the data channel.
    local_readers: bool = True
    #: Concurrent RPCs; each in-flight stream holds one thread.
    workers: int = 64
    #: On SIGTERM, after leaving the ring: seconds to spend handing entries
    #: to their new owners (0: none, they are lost as in a crash).
    drain_timeout_s: float = 10.0
    #: After each ring change, push entries to the members of their replica
    #: sets that lack them (node/rebalance.py). 0 turns that off: new owners
    #: then warm only by handoff on a miss, and a second change can lose
    #: keys (kept for tests of handoff alone); any other value turns it on
    #: (scans are not bounded in time: they yield to the data path instead).
    rereplicate_timeout_s: float = 60.0
    #: Fraction of wall time a background scan may use while gets or puts
    #: are being served (node/pace.py); it is then at most 1/share slower.
    #: 1.0: never pause.
    background_share: float = PaceConfig.share
    #: A plaintext port serving only grpc.health.v1, for Kubernetes' probes
    #: (None: none; health is on the main port in any case).
    health_port: int | None = None
    #: A directory for the disk tier (node/tiered.py): entries evicted from
    #: RAM are written there behind the data path, served from there on a
    #: RAM miss, and found again after a restart (warm restart). None: no tier.
    disk_path: str | None = None
    #: Byte budget of the disk tier's files (needs ``disk_path``).
    disk_capacity: int = 0
    #: RAM set aside (out of ``capacity``) for evicted bytes waiting to be
    #: written; 0: min(256 MiB, capacity / 8). Past it evictions are dropped.
    disk_queue: int = 0
    #: JSON tokens file (tensorcache/auth.py): every call, on gRPC and the
    #: data channel, needs a token and is checked against its grant.
    auth_tokens: str | None = None
    #: Presented to the router and to peer nodes (needs ``admin``); never in a repr.
    token: str | None = field(default=None, repr=False)
    #: Port serving Prometheus metrics at /metrics on ``host`` (0: any free
    #: port; None: no metrics, and nothing recorded on the data path).
    metrics_port: int | None = None
    #: Mutual TLS on the gRPC port, the data channel and every call this node
    #: makes (tensorcache/tls.py); the health port stays plaintext.
    tls: TLSFiles | None = None
    #: With ``tls``: True (None means the same) runs the data channel over
    #: mutual TLS; False leaves it plaintext, for networks the CNI or a mesh
    #: encrypts, admitting only connections with a ticket issued over mTLS
    #: gRPC (node/tickets.py). Without ``tls`` only None is valid.
    data_channel_encryption: bool | None = None
    #: How long a data-channel ticket admits a connection after it is issued.
    data_ticket_ttl_s: float = 30.0
    #: At most one key-event Publish to the router per this many seconds
    #: while commits keep coming (node/events.py: what it saves, what it costs).
    events_min_gap_s: float = MIN_GAP_S

    def __post_init__(self) -> None:
        if self.data_channel_encryption is not None and self.tls is None:
            # Either value would mislead: "on" cannot encrypt without
            # certificates, "off" has no mutual-TLS gRPC to issue tickets over.
            raise ValueError(
                "data_channel_encryption (--data-channel-encryption) needs TLS "
                "(--tls-cert/--tls-key/--tls-ca): without it the data channel is "
                "plaintext and unauthenticated by tickets"
            )
        if not 0 <= self.events_min_gap_s <= 1:
            raise ValueError(f"events_min_gap_s must be in [0, 1], got {self.events_min_gap_s}")
        if not 0 < self.data_ticket_ttl_s <= 300:
            raise ValueError(f"data_ticket_ttl_s must be in (0, 300], got {self.data_ticket_ttl_s}")
        if not self.name or len(self.name) > 253:
            raise ValueError(f"name {self.name!r} must be 1..253 characters")
        if self.capacity <= 0:
            raise ValueError(f"capacity must be > 0 bytes, got {self.capacity}")
        if self.policy.lower() not in POLICIES:
            raise ValueError(f"policy {self.policy!r} is not one of {sorted(POLICIES)}")
        if self.pinned_capacity is not None and not 0 <= self.pinned_capacity <= self.capacity:
            raise ValueError(
                f"pinned_capacity must be 0..capacity ({self.capacity}), got {self.pinned_capacity}"
            )
        if self.recv_pool is not None and self.recv_pool < 0:
            raise ValueError(f"recv_pool must be >= 0 bytes, got {self.recv_pool}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be 0..65535, got {self.port}")
        if self.data_port is not None and not 0 <= self.data_port < 65536:
            raise ValueError(f"data_port must be 0..65535 or None, got {self.data_port}")
        if self.health_port is not None and not 0 <= self.health_port < 65536:
            raise ValueError(f"health_port must be 0..65535 or None, got {self.health_port}")
        if self.metrics_port is not None and not 0 <= self.metrics_port < 65536:
            raise ValueError(f"metrics_port must be 0..65535 or None, got {self.metrics_port}")
        if self.workers < 4:
            raise ValueError(f"workers must be >= 4, got {self.workers}")
        if not 0 <= self.drain_timeout_s <= 3600:
            raise ValueError(f"drain_timeout_s must be 0..3600, got {self.drain_timeout_s}")
        if self.disk_path is not None and self.disk_capacity <= 0:
            raise ValueError(
                f"disk_capacity must be > 0 with a disk_path, got {self.disk_capacity}"
            )
        if not 0.05 <= self.background_share <= 1.0:
            raise ValueError(f"background_share must be 0.05..1, got {self.background_share}")
        if not 0 <= self.rereplicate_timeout_s <= 3600:
            raise ValueError(
                f"rereplicate_timeout_s must be 0..3600, got {self.rereplicate_timeout_s}"
            )


class NodeServer:
    """A running node: gRPC server, store and (optionally) membership agent."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.rings = RingView(config.name)
        self.store: Store
        if config.disk_path is not None:
            self.store = TieredStore(
                config.capacity,
                config.policy,
                disk_path=config.disk_path,
                disk_capacity=config.disk_capacity,
                queue_bytes=config.disk_queue or None,
                stale=self.rings.stale,
                judge=self.rings,
                pinned_capacity=config.pinned_capacity,
            )
        else:
            self.store = Store(
                config.capacity,
                config.policy,
                stale=self.rings.stale,
                judge=self.rings,
                pinned_capacity=config.pinned_capacity,
            )
        self.incarnation = secrets.randbits(63) | 1
        self.epochs = EpochView()
        creds = Credentials(config.token, config.tls)
        self.peers = GrpcPeers(creds)
        tokens = PolicyFile(config.auth_tokens) if config.auth_tokens else None
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="node-rpc"),
            options=SERVER_OPTIONS,
            maximum_concurrent_rpcs=config.workers,
            interceptors=[authz.interceptor(tokens)] if tokens else None,
        )
        self.port = bind(self._server, config.host, config.port, config.tls)
        host = config.advertise or config.host
        self.address = _join(host, self.port)
        events = (
            EventPublisher(
                config.router, config.name, creds=creds, min_gap_s=config.events_min_gap_s
            )
            if config.router
            else NoEvents()
        )
        self._agent: MembershipAgent | None = None
        self.ops = NodeOps(
            self.store,
            config.name,
            self.address,
            self.epochs,
            rings=self.rings,
            peers=self.peers,
            events=events,
            sync=self._sync,
            rereplicate=config.rereplicate_timeout_s > 0,
            incarnation=self.incarnation,
            pace=PaceConfig(share=config.background_share),
        )
        self.metrics = NodeMetrics() if config.metrics_port is not None else None
        self._exporter: Exporter | None = None
        self.metrics_port = 0
        self._server.add_generic_rpc_handlers((NodeService(self.ops, self.metrics).handler(),))
        # Health: "" is SERVING while the process runs (liveness); SERVICE is
        # readiness: SERVING only while this node is in the ring it holds, so
        # NOT_SERVING while it joins and from the moment it starts to drain.
        self._health = add_health(self._server, SERVICE)
        self._health_lock = threading.Lock()
        self._draining = False
        self._health_server: grpc.Server | None = None
        self.health_port = 0
        if config.router:
            self._set_ready(False)
        self._data: DataServer | None = None
        self.data_address = ""
        # A random token at a known address proves co-location to clients.
        self._local_token = secrets.token_bytes(16)
        local = config.local_readers and config.data_port is not None and localread.AVAILABLE
        ticketed = config.tls is not None and config.data_channel_encryption is False
        if config.data_port is not None:
            book = TicketBook(config.name, ttl_s=config.data_ticket_ttl_s) if ticketed else None
            if book is not None:
                self._server.add_generic_rpc_handlers(
                    (tickets.TicketService(book, tokens).handler(),)
                )
            pool = RecvPool(
                min(config.capacity // 2, 4 * 1024**3)
                if config.recv_pool is None
                else config.recv_pool
            )
            self.store.keep_spare_within_budget(pool)
            self._data = DataServer(
                self.ops,
                config.host,
                config.data_port,
                tokens=tokens,
                metrics=self.metrics,
                tls=ReloadingContext(config.tls) if config.tls and not ticketed else None,
                tickets=book,
                pool=pool,
            )
            self.data_address = _join(host, self._data.port)
        if local:
            localread.allow_local_readers()
        if config.router:
            member = pb.Member(
                name=config.name,
                address=self.address,
                capacity=config.capacity,
                data_address=self.data_address,
                local_pid=os.getpid() if local else 0,
                local_token_addr=localread.address_of(self._local_token) if local else 0,
                local_token=self._local_token if local else b"",
                incarnation=self.incarnation,
                data_ticket=ticketed and self._data is not None,
            )
            self._agent = MembershipAgent(
                config.router, member, self.epochs, self._on_ring, self.rings.mark_gap, creds
            )
            self.ops.lease = self._agent.lease

    def _on_ring(self, ring: Ring, earlier: Earlier = ()) -> None:
        """A new ring: demote what moved away (the agent publishes its epoch after)."""
        self.ops.install_ring(ring, earlier)
        self._set_ready(self.config.name in ring)

    def _set_ready(self, ready: bool) -> None:
        with self._health_lock:
            serving = ready and not self._draining
            self._health.set(
                SERVICE,
                health_pb2.HealthCheckResponse.SERVING
                if serving
                else health_pb2.HealthCheckResponse.NOT_SERVING,
            )

    def _sync(self, epoch: int) -> None:
        if self._agent is not None:
            self._agent.sync(epoch)

    def start(self) -> NodeServer:
        if self.metrics is not None and self.config.metrics_port is not None:
            collector = NodeCollector(self.ops.stat, self.metrics, self._data)
            self._exporter = Exporter([collector], self.config.host, self.config.metrics_port)
            self.metrics_port = self._exporter.port
        self._server.start()
        if self.config.health_port is not None:
            self._health_server, self.health_port = health_server(
                self._health, self.config.host, self.config.health_port
            )
        if self._data is not None:
            self._data.start()
        if self._agent is not None:
            self._agent.start()
        return self

    def wait_registered(self, timeout: float) -> bool:
        return self._agent is None or self._agent.wait_registered(timeout)

    def stop(self, grace: float = 5.0) -> None:
        """Leave the ring, hand entries to their new owners, then finish in-flight RPCs.

        Draining takes up to ``config.drain_timeout_s``; in-flight RPCs get
        ``grace`` seconds more. The servers keep answering meanwhile (new
        owners may ask this node for handoffs).
        """
        with self._health_lock:
            self._draining = True
        self._set_ready(False)
        # Refuse pushes from now on: one accepted after the last drain round
        # would leave with us (its sender retries at the key's next owner).
        self.ops.leaving = True
        if self._agent is not None:
            ring = self._agent.leave()
            if ring is not None and self.config.drain_timeout_s > 0:
                self.ops.drain(self._agent.latest, self.config.drain_timeout_s)
            self._agent.close()
        self._server.stop(grace).wait()
        if self._data is not None:
            self._data.stop()
        self.ops.close()
        if isinstance(self.store, TieredStore):
            self.store.close()  # queued writes finish (bounded): they are kept for a restart
        self.peers.close()
        if self._exporter is not None:
            self._exporter.close()
        if self._health_server is not None:  # last: liveness holds until the very end
            self._health_server.stop(0).wait()


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", default=None, help="stable node name (default: hostname-port)")
    p.add_argument("--router", default=None, help="router host:port to register with")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="port (default 0: any free port)")
    p.add_argument("--capacity", default="4GiB", help="byte budget (default 4GiB)")
    p.add_argument("--policy", default="lru", choices=sorted(POLICIES), help="eviction policy")
    p.add_argument(
        "--pinned-capacity",
        default=None,
        help="bytes of --capacity that pinned entries (never evicted) may hold; beyond it a "
        "pin is refused (default: half of --capacity; 0: no pins)",
    )
    p.add_argument(
        "--recv-pool",
        default=None,
        help="bytes of put receive buffers kept for reuse instead of faulting in fresh memory "
        "(default: min(--capacity / 2, 4GiB); 0: off). Idle buffers count against --capacity "
        "and are given back before any entry is evicted",
    )
    p.add_argument("--advertise", default=None, help="host clients should use (default --host)")
    p.add_argument(
        "--data-port",
        type=int,
        default=0,
        help="TCP data channel port (default 0: any free port; -1: disable, gRPC only)",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=10.0,
        help="seconds to hand entries to their new owners on SIGTERM (default 10; 0: none)",
    )
    p.add_argument(
        "--rereplicate-timeout",
        type=float,
        default=60.0,
        help="0 turns off pushing entries to replica members that lack them after a "
        "ring change (new owners then warm by handoff on a miss only); any other "
        "value (default 60) keeps it on",
    )
    p.add_argument(
        "--health-port",
        type=int,
        default=-1,
        help="plaintext port serving only grpc.health.v1, for Kubernetes probes "
        "(default -1: none; health is also on --port)",
    )
    p.add_argument(
        "--disk-path",
        default=None,
        help="directory for a disk tier under RAM: evicted entries are written there "
        "and served from there; a restart with the same name and path finds them again",
    )
    p.add_argument(
        "--disk-capacity",
        default=None,
        help="byte budget of the disk tier (e.g. 100GiB; required with --disk-path)",
    )
    p.add_argument(
        "--disk-queue",
        default=None,
        help="RAM (out of --capacity) for evicted bytes waiting to be written to the "
        "disk tier (default: min(256MiB, capacity/8)); evictions past it are dropped",
    )
    tls.add_arguments(p)
    tickets.add_arguments(p)
    p.add_argument(
        "--auth-tokens",
        metavar="FILE",
        default=None,
        help="JSON file of tokens and their grants (docs/security.md): every call then "
        "needs a token; the node presents $TENSORCACHE_TOKEN (admin) to its router and peers",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=-1,
        help="serve Prometheus metrics at http://HOST:PORT/metrics (0: any free port; "
        "default -1: off, nothing recorded)",
    )
    p.add_argument(
        "--background-share",
        type=float,
        default=PaceConfig.share,
        help="fraction of time a rebalance scan may use while gets or puts are served "
        f"(default {PaceConfig.share}: at most 2x slower than unpaced; 1: never pause)",
    )
    p.add_argument(
        "--events-min-gap-ms",
        type=float,
        default=MIN_GAP_S * 1000,
        help="at most one key-event publish to the router per this many ms while commits "
        f"keep coming (default {MIN_GAP_S * 1000:g}; 0: one per commit, as before #18)",
    )
    p.add_argument(
        "--no-local-readers",
        action="store_true",
        help="do not let same-host clients read entries with process_vm_readv",
    )


def run(args: argparse.Namespace) -> int:
    config = NodeConfig(
        name=args.name or f"{socket.gethostname()}-{args.port}",
        router=args.router,
        host=args.host,
        port=args.port,
        capacity=parse_size(args.capacity),
        policy=args.policy,
        pinned_capacity=None if args.pinned_capacity is None else parse_size(args.pinned_capacity),
        recv_pool=None if args.recv_pool is None else parse_size(args.recv_pool),
        advertise=args.advertise,
        data_port=None if args.data_port < 0 else args.data_port,
        local_readers=not args.no_local_readers,
        drain_timeout_s=args.drain_timeout,
        rereplicate_timeout_s=args.rereplicate_timeout,
        background_share=args.background_share,
        health_port=None if args.health_port < 0 else args.health_port,
        disk_path=args.disk_path,
        disk_capacity=parse_size(args.disk_capacity) if args.disk_capacity else 0,
        disk_queue=parse_size(args.disk_queue) if args.disk_queue else 0,
        auth_tokens=args.auth_tokens,
        token=os.environ.get(TOKEN_ENV) or None,
        metrics_port=None if args.metrics_port < 0 else args.metrics_port,
        tls=tls.from_args(args),
        data_channel_encryption=tickets.from_args(args),
        events_min_gap_s=args.events_min_gap_ms / 1000,
    )
    # Handlers first: a SIGTERM that arrives while the node starts (a restart
    # followed at once by a scale-down) still gets a graceful leave and exit 0.
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    node = NodeServer(config).start()
    metrics = f"metrics {_join(config.host, node.metrics_port)} " if node.metrics else ""
    print(
        f"tensorcache node {config.name} data {node.data_address or '-'} "
        f"{metrics}listening on {node.address}",
        flush=True,
    )
    while not stop.wait(0.5):  # timed: a signal taken by another thread still wakes us
        pass
    node.stop()
    # Leaving: a second SIGTERM (a launcher's death signal, a kubelet's repeat)
    # must not turn a clean exit into death by signal during interpreter shutdown.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return 0
