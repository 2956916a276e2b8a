"""The node's DataTickets service: tickets for its plaintext data channel.

Served on the node's mutual-TLS gRPC port only when the node runs with
``--data-channel-encryption off`` (tensorcache/tickets.py has the design).
A caller needs a certificate the cluster's CA signed (the TLS handshake
checks that before this code runs) and, with tokens on, a known token (the
AuthInterceptor checks it; any token will do: the ticket carries its name,
and the data channel applies that token's grant to every request).
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Mapping
from typing import Any

import grpc

from tensorcache.authgrpc import PolicyFile, token_of
from tensorcache.errors import TensorCacheError, Unauthenticated, status_code
from tensorcache.proto import tensorcache_pb2 as pb
from tensorcache.tickets import SERVICE, TicketBook

log = logging.getLogger("tensorcache.node")


def _identity(context: grpc.ServicerContext) -> str:
    """The client certificate's subject (its SANs, else its CN); "" without one."""
    auth: Mapping[str, Any] = context.auth_context()
    names: list[bytes] = list(
        auth.get("x509_subject_alternative_name") or auth.get("x509_common_name") or []
    )
    return ",".join(n.decode("utf-8", "replace") for n in names)


class TicketService:
    def __init__(self, book: TicketBook, tokens: PolicyFile | None) -> None:
        self._book = book
        self._tokens = tokens

    def issue(
        self, request: pb.DataTicketRequest, context: grpc.ServicerContext
    ) -> pb.DataTicketReply:
        try:
            auth: Mapping[str, Any] = context.auth_context()
            if list(auth.get("transport_security_type") or []) != [b"ssl"]:
                # Never served without TLS (node/server.py); kept as a guard.
                raise Unauthenticated("data tickets are issued over mutual TLS only")
            grant = None
            if self._tokens is not None:
                grant = self._tokens.authenticate(token_of(context.invocation_metadata()))
            ticket = self._book.issue(
                request.client_host, request.client_port, grant, _identity(context)
            )
        except TensorCacheError as exc:
            context.abort(status_code(exc), str(exc))
        return pb.DataTicketReply(ticket=ticket, ttl_ms=int(self._book.ttl_s * 1000))

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Issue": grpc.unary_unary_rpc_method_handler(
                    self.issue,
                    request_deserializer=pb.DataTicketRequest.FromString,
                    response_serializer=pb.DataTicketReply.SerializeToString,
                )
            },
        )


# ------------------------------------------------------------------ the flag
ENV = "TENSORCACHE_DATA_CHANNEL_ENCRYPTION"
_CHOICES = {"on": True, "off": False}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data-channel-encryption",
        choices=sorted(_CHOICES),
        default=None,
        help="with --tls-*: 'on' (default) runs the data channel over mutual TLS; 'off' "
        "leaves it plaintext for networks the CNI or a mesh already encrypts, and admits "
        "only connections that bring a ticket issued over mutual-TLS gRPC "
        "(docs/security.md); without --tls-* either value is an error "
        f"(default: ${ENV}, else on with TLS)",
    )


def from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> bool | None:
    """True/False as the flag (or the environment) says; None: unset (on with TLS)."""
    value = args.data_channel_encryption
    if value is None:
        value = (os.environ if env is None else env).get(ENV) or None
    if value is None:
        return None
    if value not in _CHOICES:
        raise ValueError(f"{ENV} must be 'on' or 'off', got {value!r}")
    return _CHOICES[value]
