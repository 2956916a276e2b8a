"""Router process: config, ``create_server`` and the ``tensorcache router`` entry."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from concurrent import futures
from dataclasses import dataclass

import grpc

from tensorcache.grpcutil import SERVER_OPTIONS, add_health, bind
from tensorcache.proto import tensorcache_pb2_grpc as pb_grpc
from tensorcache.router.membership import EmbeddedMembership, Membership
from tensorcache.router.ring import DEFAULT_VNODES, DEFAULT_WEIGHT_UNIT
from tensorcache.router.service import RouterService
from tensorcache.sizes import parse_size

log = logging.getLogger("tensorcache.router")

DEFAULT_STRIPE_SIZE = 8 * 1024 * 1024


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

    def __post_init__(self) -> None:
        if self.stripe_size < 4096:
            raise ValueError(f"stripe_size must be >= 4096 bytes, got {self.stripe_size}")
        if not 0 < self.heartbeat_interval_s < self.ttl_s:
            raise ValueError("need 0 < heartbeat_interval_s < ttl_s")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be 0..65535, got {self.port}")


def _membership(config: RouterConfig) -> Membership:
    if config.etcd is None:
        return EmbeddedMembership(config.ttl_s, sweep_interval_s=config.heartbeat_interval_s)
    # Imported here so the embedded router does not need aetcd installed to start.
    from tensorcache.router.etcd_membership import EtcdMembership

    return EtcdMembership(config.etcd, config.ttl_s)


def create_server(config: RouterConfig) -> tuple[grpc.Server, int, Membership]:
    """Build and start a router; returns (server, bound port, membership)."""
    membership = _membership(config)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=SERVER_OPTIONS)
    pb_grpc.add_RouterServicer_to_server(
        RouterService(
            membership,
            stripe_size=config.stripe_size,
            vnodes=config.vnodes,
            weight_unit=config.weight_unit,
            heartbeat_interval_s=config.heartbeat_interval_s,
            ttl_s=config.ttl_s,
        ),
        server,
    )
    add_health(server, "tensorcache.v1.Router")
    port = bind(server, config.host, config.port)
    server.start()
    return server, port, membership


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


def run(args: argparse.Namespace) -> int:
    config = RouterConfig(
        host=args.host,
        port=args.port,
        stripe_size=parse_size(args.stripe_size),
        heartbeat_interval_s=args.heartbeat_interval,
        ttl_s=args.ttl,
        etcd=args.etcd,
    )
    server, port, membership = create_server(config)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"tensorcache router listening on {config.host}:{port}", flush=True)
    while not stop.wait(0.5):  # timed: a signal taken by another thread still wakes us
        pass
    server.stop(grace=2).wait()
    membership.close()
    return 0
