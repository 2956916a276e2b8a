"""Client side of data-channel tickets (tensorcache/tickets.py has the design).

A node whose ring entry says ``data_ticket`` runs its data channel in
plaintext and admits a connection only with a ticket bound to the
connection's source address. So the socket is bound first (the source IP
the kernel would route from, and a free port), the ticket is asked for over
the node's mutual-TLS gRPC channel naming that address, and only then does
the socket connect. The token (if any) travels only inside gRPC's TLS: a
ticketed data connection never carries it.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable

import grpc

from tensorcache.errors import Unavailable, from_rpc_error
from tensorcache.proto import tensorcache_pb2 as pb
from tensorcache.tickets import ISSUE

#: (bound host, bound port) -> the ticket for a connection from there.
TicketSource = Callable[[str, int], bytes]


def issuer(channel: grpc.Channel, where: str, timeout_s: float) -> TicketSource:
    """Ask ``DataTickets/Issue`` on a node's (mutual-TLS) gRPC channel."""
    call = channel.unary_unary(
        ISSUE,
        request_serializer=pb.DataTicketRequest.SerializeToString,
        response_deserializer=pb.DataTicketReply.FromString,
    )

    def ask(host: str, port: int) -> bytes:
        try:
            reply = call(
                pb.DataTicketRequest(client_host=host, client_port=port), timeout=timeout_s
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, f"data ticket from node {where}") from exc
        return bytes(reply.ticket)

    return ask


def connect_ticketed(
    address: tuple[str, int], timeout_s: float, source: TicketSource
) -> tuple[socket.socket, bytes]:
    """A TCP connection to ``address`` and the ticket that admits it (to send first)."""
    try:
        family, _, _, _, sockaddr = socket.getaddrinfo(
            address[0], address[1], type=socket.SOCK_STREAM
        )[0]
        # The source address the kernel routes from: a UDP "connect" sends
        # nothing, it only picks the route.
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect(sockaddr)
            local_ip = probe.getsockname()[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        raise Unavailable(f"data channel {address[0]}:{address[1]}: {exc}") from exc
    try:
        sock.bind((local_ip, 0))
        host, port = sock.getsockname()[:2]
        ticket = source(host, port)  # before connecting: the ticket names this socket
        sock.settimeout(timeout_s)
        sock.connect(sockaddr)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            sock.close()
        if isinstance(exc, OSError):
            raise Unavailable(f"data channel {address[0]}:{address[1]}: {exc}") from exc
        raise
    return sock, ticket
