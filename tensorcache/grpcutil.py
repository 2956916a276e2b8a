"""gRPC settings shared by servers and clients, chosen on purpose.

Message-size limits: payload messages are at most ``chunk_size`` (4 MiB by
default) and headers are small, but a GetReply header of a 65,536-key batch
or a manifest of a multi-GiB tensor can reach a few MiB, so both directions
allow ``MAX_MESSAGE`` (64 MiB). Anything larger is a bug or an attack and is
refused by gRPC with RESOURCE_EXHAUSTED before it reaches our code.
"""

from __future__ import annotations

from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tensorcache.authgrpc import NO_CREDENTIALS, Credentials
from tensorcache.proto import tensorcache_pb2 as pb
from tensorcache.tls import TLSFiles

MAX_MESSAGE = 64 * 1024 * 1024

SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.so_reuseport", 0),  # never share a port with a stale process
]

CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
    # Reconnect quickly after a node restarts (the default backs off to 120 s).
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


def add_health(server: grpc.Server, *services: str) -> health.HealthServicer:
    """Register the standard grpc.health.v1 service and mark ``services`` SERVING."""
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    for name in ("", *services):
        servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return servicer


def health_server(servicer: health.HealthServicer, host: str, port: int) -> tuple[grpc.Server, int]:
    """A started plaintext server with only ``servicer`` (grpc.health.v1) on it.

    Kubernetes' gRPC probes cannot speak TLS, so health gets a port of its
    own that stays plaintext whatever the main port becomes. It shares the
    main server's servicer: both ports always tell the same status.
    """
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="health"),
        options=SERVER_OPTIONS,
    )
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    bound = bind(server, host, port)
    server.start()
    return server, bound


def bind(server: grpc.Server, host: str, port: int, tls: TLSFiles | None = None) -> int:
    """Bind ``host:port`` (port 0: any free port) and return the bound port.

    ``tls``: mutual TLS on this port (tensorcache/tls.py); plaintext is refused."""
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if tls is not None:
        bound = server.add_secure_port(address, tls.server_credentials())
    else:
        bound = server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"could not bind {address}")
    return bound


#: The node's gRPC service (proto/tensorcache.proto), named once.
NODE_SERVICE = "tensorcache.v1.Node"


class NodeStub:
    """One node's gRPC methods on one channel, for clients and peer nodes alike.

    Put and Get carry raw byte streams on their payload side (the header is
    the first message; proto/tensorcache.proto says why), so they are bound
    with identity (de)serializers there; the other methods are typed.
    """

    def __init__(self, address: str, creds: Credentials = NO_CREDENTIALS) -> None:
        self.address = address
        self.channel = creds.channel(address, CHANNEL_OPTIONS)
        method = f"/{NODE_SERVICE}/"
        self.put: grpc.StreamUnaryMultiCallable[bytes, pb.PutReply] = self.channel.stream_unary(
            method + "Put",
            request_serializer=None,
            response_deserializer=pb.PutReply.FromString,
        )
        self.get: grpc.UnaryStreamMultiCallable[pb.GetRequest, bytes] = self.channel.unary_stream(
            method + "Get",
            request_serializer=pb.GetRequest.SerializeToString,
            response_deserializer=None,
        )
        self.delete = self.channel.unary_unary(
            method + "Delete",
            request_serializer=pb.DeleteRequest.SerializeToString,
            response_deserializer=pb.DeleteReply.FromString,
        )
        self.fill = self.channel.unary_unary(
            method + "Fill",
            request_serializer=pb.FillRequest.SerializeToString,
            response_deserializer=pb.FillReply.FromString,
        )
        self.fence = self.channel.unary_unary(
            method + "Fence",
            request_serializer=pb.FenceRequest.SerializeToString,
            response_deserializer=pb.FenceReply.FromString,
        )
        self.pin = self.channel.unary_unary(
            method + "Pin",
            request_serializer=pb.PinRequest.SerializeToString,
            response_deserializer=pb.PinReply.FromString,
        )
        self.stat = self.channel.unary_unary(
            method + "Stat",
            request_serializer=pb.StatRequest.SerializeToString,
            response_deserializer=pb.NodeStats.FromString,
        )

    def close(self) -> None:
        self.channel.close()
