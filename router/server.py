"""Router process: config, ``create_server`` and the ``tensorcache router`` entry."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2

from tensorcache import tls
from tensorcache.auth import TOKEN_ENV
from tensorcache.authgrpc import Credentials, PolicyFile
from tensorcache.grpcutil import SERVER_OPTIONS, add_health, bind, health_server
from tensorcache.metrics import Exporter
from tensorcache.proto import tensorcache_pb2_grpc as pb_grpc
from tensorcache.ring import DEFAULT_VNODES, DEFAULT_WEIGHT_UNIT
from tensorcache.router import authz, etcd_auth
from tensorcache.router.announce import Announcer, NoAnnouncer
from tensorcache.router.etcd_auth import EtcdAuth
from tensorcache.router.events import DEFAULT_MAX_WATCHERS, EventHub
from tensorcache.router.follower import ViewFollower
from tensorcache.router.membership import EmbeddedMembership, Membership, MembershipStatus
from tensorcache.router.metrics import RouterCollector
from tensorcache.router.relay import Relay
from tensorcache.router.service import RouterService
from tensorcache.sizes import parse_size
from tensorcache.tls import TLSFiles

log = logging.getLogger("tensorcache.router")

DEFAULT_STRIPE_SIZE = 8 * 1024 * 1024
SERVICE = "tensorcache.v1.Router"


@dataclass(frozen=True)
class RouterConfig:
    """Router settings. Defaults suit a local cluster; see docs/operations.md."""

    host: str = "127.0.0.1"
    port: int = 7070
    #: Tensors above this many bytes are striped over the ring (cluster default).
    stripe_size: int = DEFAULT_STRIPE_SIZE
    #: How often nodes heartbeat, and how long a silent node stays in the ring.
    heartbeat_interval_s: float = 1.0
    ttl_s: float = 3.0
    vnodes: int = DEFAULT_VNODES
    weight_unit: int = DEFAULT_WEIGHT_UNIT
    #: etcd client URL (http://host:port): keep membership there, so several
    #: routers can serve at once and a restart loses nothing. None: in memory.
    etcd: str | None = None
    #: Seconds an etcd call may take before it fails with UNAVAILABLE.
    etcd_timeout_s: float = 5.0
    #: Copies of each entry, on distinct nodes (published in every ring snapshot).
    replicas: int = 1
    #: Router.Watch streams served at once (each holds a server thread).
    max_watchers: int = DEFAULT_MAX_WATCHERS
    #: host other routers reach this one at (default: ``host``); with etcd,
    #: routers relay nodes' key events to each other (router/relay.py).
    advertise: str | None = None
    #: A plaintext port serving only grpc.health.v1, for Kubernetes' probes
    #: (None: none; health is on the main port in any case).
    health_port: int | None = None
    #: JSON tokens file (tensorcache/auth.py): every call needs a token and
    #: is checked against its grant. None: no tokens checked.
    auth_tokens: str | None = None
    #: Presented to other routers (event relay); never shown in a repr.
    token: str | None = field(default=None, repr=False)
    #: Port serving Prometheus metrics at /metrics on ``host`` (0: any free
    #: port; None: none).
    metrics_port: int | None = None
    #: Mutual TLS on the gRPC port and to other routers; health stays plaintext.
    tls: TLSFiles | None = None
    #: With ``tls``: the name other routers' certificates must carry, checked
    #: instead of their advertised address (a pod IP behind a Service, which
    #: cert-manager cannot put in a certificate). None: the address itself.
    tls_peer_name: str | None = None
    #: TLS (an https:// etcd URL) and user/password for etcd (router/etcd_conn.py).
    etcd_auth: EtcdAuth | None = None

    def __post_init__(self) -> None:
        if self.metrics_port is not None and not 0 <= self.metrics_port < 65536:
            raise ValueError(f"metrics_port must be 0..65535 or None, got {self.metrics_port}")
        if self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas}")
        if self.etcd_timeout_s <= 0:
            raise ValueError(f"etcd_timeout_s must be > 0, got {self.etcd_timeout_s}")
        if self.max_watchers < 0:
            raise ValueError(f"max_watchers must be >= 0, got {self.max_watchers}")
        if self.stripe_size < 4096:
            raise ValueError(f"stripe_size must be >= 4096 bytes, got {self.stripe_size}")
        if not 0 < self.heartbeat_interval_s < self.ttl_s:
            raise ValueError("need 0 < heartbeat_interval_s < ttl_s")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be 0..65535, got {self.port}")
        if self.health_port is not None and not 0 <= self.health_port < 65536:
            raise ValueError(f"health_port must be 0..65535 or None, got {self.health_port}")


def _control_plane(config: RouterConfig) -> tuple[Membership, Announcer]:
    """The membership, and how this router finds the others (etcd: both in etcd)."""
    if config.etcd is None:
        embedded = EmbeddedMembership(config.ttl_s, sweep_interval_s=config.heartbeat_interval_s)
        return embedded, NoAnnouncer()
    # Imported here so the embedded router does not need aetcd installed to start.
    from tensorcache.router.etcd_membership import EtcdMembership

    etcd = EtcdMembership(
        config.etcd, config.ttl_s, timeout_s=config.etcd_timeout_s, auth=config.etcd_auth
    )
    return etcd, etcd.announcer


class _Health:
    """grpc health of the Router service follows the membership's state.

    "" (the process) stays SERVING while the router runs: it still serves
    the last ring when etcd is down, so liveness and readiness probes should
    ask for "". The "tensorcache.v1.Router" service is NOT_SERVING while
    membership is degraded (node joins and invalidations fail), for alerts.
    """

    def __init__(self, servicer: health.HealthServicer) -> None:
        self._servicer = servicer
        self._state = "ok"

    def __call__(self, status: MembershipStatus) -> None:
        if status.state == self._state:
            return
        self._state = status.state
        serving = health_pb2.HealthCheckResponse.SERVING
        self._servicer.set(
            SERVICE, serving if status.state == "ok" else health_pb2.HealthCheckResponse.NOT_SERVING
        )


@dataclass
class RunningRouter:
    """A started router: its server, bound port and the parts to shut down."""

    server: grpc.Server
    port: int
    membership: Membership
    hub: EventHub
    follower: ViewFollower
    relay: Relay | None = None
    health: grpc.Server | None = None
    health_port: int = 0
    exporter: Exporter | None = None

    @property
    def metrics_port(self) -> int:
        return self.exporter.port if self.exporter is not None else 0

    def stop(self, grace: float = 2.0) -> None:
        """End watch streams cleanly, stop serving, then let go of membership."""
        if self.relay is not None:
            self.relay.close()
        self.hub.close()
        self.server.stop(grace=grace).wait()
        self.follower.stop()
        self.membership.close()
        if self.exporter is not None:
            self.exporter.close()
        if self.health is not None:
            self.health.stop(0).wait()


def create_server(config: RouterConfig) -> RunningRouter:
    """Build and start a router."""
    membership, announcer = _control_plane(config)
    hub = EventHub(max_watchers=config.max_watchers)

    # Each watch stream holds a thread for its lifetime; unary calls get their own 16.
    tokens = PolicyFile(config.auth_tokens) if config.auth_tokens else None
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=16 + config.max_watchers),
        options=SERVER_OPTIONS,
        interceptors=[authz.interceptor(tokens)] if tokens else None,
    )
    servicer = RouterService(
        membership,
        stripe_size=config.stripe_size,
        vnodes=config.vnodes,
        weight_unit=config.weight_unit,
        heartbeat_interval_s=config.heartbeat_interval_s,
        ttl_s=config.ttl_s,
        replicas=config.replicas,
        hub=hub,
    )
    pb_grpc.add_RouterServicer_to_server(servicer, server)
    health_servicer = add_health(server, SERVICE)
    follower = ViewFollower(membership, hub, _Health(health_servicer)).start()
    try:
        port = bind(server, config.host, config.port, config.tls)
    except BaseException:
        follower.stop()
        membership.close()
        raise
    server.start()
    # Embedded, the announcer finds no other router, so the relay forwards to nobody.
    me = f"{config.advertise or config.host}:{port}"
    relay = Relay(
        me,
        announcer.routers,
        lambda: announcer.keep_announced(me),
        creds=Credentials(config.token, config.tls, server_name=config.tls_peer_name),
    )
    servicer.relay = relay  # known only now that the port is bound
    running = RunningRouter(server, port, membership, hub, follower, relay)
    try:
        if config.health_port is not None:
            running.health, running.health_port = health_server(
                health_servicer, config.host, config.health_port
            )
        if config.metrics_port is not None:
            collector = RouterCollector(membership, hub, follower)
            running.exporter = Exporter([collector], config.host, config.metrics_port)
    except BaseException:
        running.stop(grace=0)
        raise
    return running


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=7070, help="port (0: any free port; default 7070)")
    p.add_argument("--stripe-size", default="8MiB", help="stripe larger tensors (default 8MiB)")
    p.add_argument("--heartbeat-interval", type=float, default=1.0, help="seconds (default 1)")
    p.add_argument("--ttl", type=float, default=3.0, help="drop silent nodes after (default 3s)")
    p.add_argument(
        "--etcd",
        metavar="URL",
        default=None,
        help="keep membership in etcd at URL, e.g. http://127.0.0.1:2379 (default: in memory)",
    )
    p.add_argument(
        "--etcd-timeout", type=float, default=5.0, help="fail etcd calls after (default 5s)"
    )
    p.add_argument(
        "--replicas", type=int, default=1, help="copies of each entry on distinct nodes (default 1)"
    )
    p.add_argument(
        "--advertise",
        default=None,
        help="host other routers reach this one at (default --host); with --etcd, routers "
        "relay key events to each other",
    )
    p.add_argument(
        "--max-watchers",
        type=int,
        default=DEFAULT_MAX_WATCHERS,
        help=f"watch streams served at once (default {DEFAULT_MAX_WATCHERS})",
    )
    p.add_argument(
        "--health-port",
        type=int,
        default=-1,
        help="plaintext port serving only grpc.health.v1, for Kubernetes probes "
        "(default -1: none; health is also on --port)",
    )
    tls.add_arguments(p)
    p.add_argument(
        "--tls-peer-name",
        default=None,
        help="with --tls-*: the DNS name other routers' certificates carry, checked when "
        "relaying to their --advertise address (pod IPs behind a Service; default: the "
        "address itself)",
    )
    etcd_auth.add_arguments(p)
    p.add_argument(
        "--auth-tokens",
        metavar="FILE",
        default=None,
        help="JSON file of tokens and their grants (docs/security.md): every call then "
        "needs a token; this router presents $TENSORCACHE_TOKEN to other routers",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=-1,
        help="serve Prometheus metrics at http://HOST:PORT/metrics (0: any free port; "
        "default -1: off)",
    )


def run(args: argparse.Namespace) -> int:
    config = RouterConfig(
        host=args.host,
        port=args.port,
        stripe_size=parse_size(args.stripe_size),
        heartbeat_interval_s=args.heartbeat_interval,
        ttl_s=args.ttl,
        etcd=args.etcd,
        etcd_timeout_s=args.etcd_timeout,
        replicas=args.replicas,
        max_watchers=args.max_watchers,
        advertise=args.advertise,
        health_port=None if args.health_port < 0 else args.health_port,
        auth_tokens=args.auth_tokens,
        token=os.environ.get(TOKEN_ENV) or None,
        metrics_port=None if args.metrics_port < 0 else args.metrics_port,
        tls=tls.from_args(args),
        tls_peer_name=args.tls_peer_name,
        etcd_auth=etcd_auth.from_args(args),
    )
    router = create_server(config)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    metrics = f"metrics {config.host}:{router.metrics_port} " if router.exporter else ""
    print(f"tensorcache router {metrics}listening on {config.host}:{router.port}", flush=True)
    while not stop.wait(0.5):  # timed: a signal taken by another thread still wakes us
        pass
    router.stop(grace=2)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # leaving: exit 0, not by a late SIGTERM
    return 0
