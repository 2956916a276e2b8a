"""Data-channel tickets: authentication for a data channel that is not encrypted.

With ``--data-channel-encryption off`` (a network the CNI or a mesh already
encrypts), a node's data channel is plain TCP and cannot see certificates.
It admits a connection only with a ticket the node itself issued, moments
before, over mutual-TLS gRPC (``DataTickets/Issue``):

1. the client binds its data socket (source IP and port) *before* asking;
2. it asks for a ticket naming that address; the node MACs, with a random
   secret only it holds, the address, its own data address, the caller's
   token name (tokens on), the certificate's subject (for logs), a random
   nonce and an expiry ``ttl_s`` ahead on its monotonic clock;
3. the client connects from the bound socket and sends the ticket as its
   first frame (op 10, after the magic); the node checks the MAC, the
   expiry, that the connection's peer address is the one named, and that the
   nonce was never used, then gives the connection the token's grant as the
   tokens file says *now* (a token revoked meanwhile opens nothing).

So a ticket opens one connection, from one address, within seconds; one
read off the wire cannot be replayed on another connection (the address
differs, or the nonce is spent), a forged or altered one fails the MAC, and
without a certificate the cluster's CA signed there is no ticket at all.
Secrets are rotated every ``rotate_s`` (the previous one verifies tickets
issued just before); a restart forgets them, and every outstanding ticket
with them. Spent nonces are remembered until their ticket expires (after
which the expiry check refuses it anyway), so the memory is bounded by
connections per ``ttl_s``.

Pure logic: the clock and randomness are injectable, no I/O
(tests/unit/test_tickets.py).
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import ipaddress
import secrets
import threading
import time
from collections.abc import Callable, Iterable

from google.protobuf.message import DecodeError

from tensorcache.auth import Grant
from tensorcache.errors import InvalidArgument, Unauthenticated
from tensorcache.proto import tensorcache_pb2 as pb

SERVICE = "tensorcache.v1.DataTickets"
ISSUE = f"/{SERVICE}/Issue"
#: The data-channel op of a ticket frame (op codes 5-9 are other control ops).
OP_TICKET = 10
#: Largest ticket frame a node reads from a connection that has not proven
#: anything yet (a ticket is ~150 bytes).
MAX_TICKET = 4096
DEFAULT_TTL_S = 30.0
DEFAULT_ROTATE_S = 600.0
MAX_IDENTITY = 256


def normalize_host(host: str, field: str = "client_host") -> str:
    """The canonical text of an IP literal (IPv4-mapped IPv6 as IPv4; no scope)."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        raise InvalidArgument(f"{field} must be an IP address, got {host[:100]!r}") from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_unspecified:
        raise InvalidArgument(
            f"{field} must be the address the data socket is bound to, not {ip} (unspecified)"
        )
    return ip.compressed


class TicketBook:
    """Issues and admits one node's data-channel tickets (thread-safe)."""

    def __init__(
        self,
        node: str,
        *,
        ttl_s: float = DEFAULT_TTL_S,
        rotate_s: float = DEFAULT_ROTATE_S,
        clock: Callable[[], float] = time.monotonic,
        random: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        """``node``: the data address tickets are for; ``ttl_s``: how long one admits."""
        if not 0 < ttl_s < rotate_s:
            raise ValueError(f"need 0 < ttl_s ({ttl_s}) < rotate_s ({rotate_s})")
        self.node = node
        self.ttl_s = ttl_s
        self._rotate_s = rotate_s
        self._clock = clock
        self._random = random
        self._lock = threading.Lock()
        self._key_id = 1
        self._keys = {1: random(32)}
        self._rotated = clock()
        self._spent: dict[bytes, float] = {}
        self._spent_order: collections.deque[tuple[float, bytes]] = collections.deque()

    def _current(self, now: float) -> tuple[int, bytes]:
        """The signing key, rotated if due; the previous one is kept for verification."""
        if now - self._rotated >= self._rotate_s:
            self._key_id += 1
            self._keys = {
                self._key_id - 1: self._keys[self._key_id - 1],
                self._key_id: self._random(32),
            }
            self._rotated = now
        return self._key_id, self._keys[self._key_id]

    def issue(
        self, client_host: str, client_port: int, grant: Grant | None, identity: str
    ) -> bytes:
        """A ticket for one connection from ``client_host:client_port``."""
        host = normalize_host(client_host)
        if not 0 < client_port < 65536:
            raise InvalidArgument(f"client_port must be 1..65535, got {client_port}")
        now = self._clock()
        with self._lock:
            key_id, key = self._current(now)
        body = pb.DataTicketBody(
            key_id=key_id,
            expires_ms=int((now + self.ttl_s) * 1000),
            nonce=self._random(16),
            node=self.node,
            client_host=host,
            client_port=client_port,
            identity=identity[:MAX_IDENTITY],
            has_grant=grant is not None,
            grant_name=grant.name if grant is not None else "",
        ).SerializeToString()
        mac = hmac.new(key, body, hashlib.sha256).digest()
        return pb.DataTicket(body=body, mac=mac).SerializeToString()

    def admit(
        self,
        raw: bytes,
        peer_host: str,
        peer_port: int,
        grants: Iterable[Grant] | None,
    ) -> tuple[Grant | None, str]:
        """Check a ticket for a connection from ``peer_host:peer_port``.

        ``grants``: the tokens file's grants now (None: this node checks no
        tokens). Returns the connection's grant (None without tokens) and the
        identity the ticket was issued to; raises Unauthenticated otherwise.
        """
        try:
            ticket = pb.DataTicket.FromString(raw)
        except DecodeError:
            raise Unauthenticated("data channel: the ticket is malformed") from None
        now = self._clock()
        with self._lock:
            self._current(now)  # rotate on schedule even when nothing is issued
            try:
                key = self._keys[pb.DataTicketBody.FromString(ticket.body).key_id]
            except (DecodeError, KeyError):
                key = None
        # Compare the MAC before trusting anything in the body (an unknown
        # key id - a restart, or one rotated out - fails here too).
        expected = hmac.new(key or b"", ticket.body, hashlib.sha256).digest()
        if key is None or not hmac.compare_digest(expected, ticket.mac):
            raise Unauthenticated(
                "data channel: the ticket was not issued by this node (forged, altered, "
                "or from before a restart); ask DataTickets/Issue for a new one"
            )
        body = pb.DataTicketBody.FromString(ticket.body)
        if body.node != self.node:
            raise Unauthenticated(f"data channel: the ticket is for {body.node}, not {self.node}")
        if now * 1000 >= body.expires_ms:
            raise Unauthenticated(
                f"data channel: the ticket expired (tickets admit a connection within "
                f"{self.ttl_s:g} s of being issued)"
            )
        try:
            host = normalize_host(peer_host, "peer address")
        except InvalidArgument:
            host = peer_host
        if (host, peer_port) != (body.client_host, body.client_port):
            raise Unauthenticated(
                f"data channel: the ticket was issued for a connection from "
                f"{body.client_host}:{body.client_port}, not {host}:{peer_port}"
            )
        grant = self._grant(body, grants)
        with self._lock:
            self._forget_spent(now)
            if body.nonce in self._spent:
                raise Unauthenticated("data channel: the ticket was already used")
            expires = body.expires_ms / 1000
            self._spent[body.nonce] = expires
            self._spent_order.append((expires, body.nonce))
        return grant, body.identity

    @staticmethod
    def _grant(body: pb.DataTicketBody, grants: Iterable[Grant] | None) -> Grant | None:
        if grants is None:
            return None
        if not body.has_grant:
            raise Unauthenticated("data channel: the ticket carries no token (issued without one)")
        for grant in grants:
            if grant.name == body.grant_name:
                return grant
        raise Unauthenticated(
            f"data channel: token {body.grant_name!r} is no longer known to this cluster"
        )

    def _forget_spent(self, now: float) -> None:
        while self._spent_order and self._spent_order[0][0] <= now:
            _, nonce = self._spent_order.popleft()
            self._spent.pop(nonce, None)

    def spent(self) -> int:
        """Nonces remembered (bounded by connections admitted per ``ttl_s``)."""
        with self._lock:
            return len(self._spent)
