"""Tokens on gRPC: the client side adds one to every call, the server side checks it.

The client's token travels as ``authorization: Bearer <token>`` metadata on
every call (a channel interceptor, so every stub, stream and method gets it
without each call site knowing). A server started with ``--auth-tokens`` runs
``AuthInterceptor``: it authenticates every call but grpc.health.v1 (probes
carry no token), then hands the call's request to the rule for its method
(per-key checks; typed requests, or the raw header bytes of the node's raw
streams). A method without a rule needs ``admin``: what nobody thought about
is closed, not open.

``PolicyFile`` re-reads the tokens file when it changes (checked at most once
a second), so tokens are added and revoked without a restart; a file that
does not parse keeps the policy in force and is logged (never its contents).
"""

from __future__ import annotations

import collections
import logging
import os
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from tensorcache.auth import ADMIN, Grant, Policy
from tensorcache.errors import TensorCacheError, Unauthenticated, status_code
from tensorcache.tls import TLSFiles

log = logging.getLogger("tensorcache.auth")

METADATA_KEY = "authorization"
EXEMPT_PREFIX = "/grpc.health.v1."
RELOAD_EVERY_S = 1.0

#: A method's check: the caller's grant and the request (the first message of
#: a request stream); raises PermissionDenied (or InvalidArgument).
Rule = Callable[[Grant, Any], None]


def admin_only(grant: Grant, request: object) -> None:
    grant.require(ADMIN)


def any_token(grant: Grant, request: object) -> None:
    """Any authenticated caller (ring snapshots, statistics: no key data)."""


# ------------------------------------------------------------------ client
@dataclass(frozen=True)
class Credentials:
    """What a process presents when it calls a node or a router."""

    token: str | None = field(default=None, repr=False)
    #: Mutual TLS (tensorcache/tls.py); None: plaintext.
    tls: TLSFiles | None = None
    #: With ``tls``: the name the server's certificate must carry, when it is
    #: not the address dialled (routers relaying to each other's pod IPs).
    server_name: str | None = None

    def data_context(self) -> ssl.SSLContext | None:
        """The data channel's client TLS context (files read now: rotation applies)."""
        return self.tls.client_context() if self.tls else None

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((METADATA_KEY, f"Bearer {self.token}"),) if self.token else ()

    def channel(self, address: str, options: Sequence[tuple[str, int | str]]) -> grpc.Channel:
        if self.tls is not None:
            if self.server_name:
                options = [*options, ("grpc.ssl_target_name_override", self.server_name)]
            channel = grpc.secure_channel(address, self.tls.channel_credentials(), options=options)
        else:
            channel = grpc.insecure_channel(address, options=options)
        if not self.token:
            return channel
        return grpc.intercept_channel(channel, _AddMetadata(self.metadata()))


NO_CREDENTIALS = Credentials()


class _CallDetails(
    collections.namedtuple(
        "_CallDetails",
        ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
    ),
    grpc.ClientCallDetails,
):
    pass


class _AddMetadata(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def _details(self, d: Any) -> _CallDetails:
        return _CallDetails(
            d.method,
            d.timeout,
            (*(d.metadata or ()), *self._metadata),
            d.credentials,
            d.wait_for_ready,
            d.compression,
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


# ------------------------------------------------------------------ server
class PolicyFile:
    """The policy of a tokens file, reloaded when the file changes."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._stamp = self._stat()
        self._policy = Policy.from_file(self.path)  # a bad file at start: fail loudly
        self._checked = time.monotonic()
        self._lock = threading.Lock()

    def _stat(self) -> tuple[int, int, int]:
        st = os.stat(self.path)
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def policy(self) -> Policy:
        now = time.monotonic()
        if now - self._checked < RELOAD_EVERY_S:
            return self._policy
        with self._lock:
            if now - self._checked < RELOAD_EVERY_S:
                return self._policy
            self._checked = now
            try:
                stamp = self._stat()
                if stamp != self._stamp:
                    self._policy = Policy.from_file(self.path)
                    self._stamp = stamp
                    log.info("auth tokens reloaded from %s", self.path)
            except (OSError, ValueError) as exc:
                log.error("auth tokens file %s not reloaded, keeping the old: %s", self.path, exc)
            return self._policy

    def authenticate(self, token: str | None) -> Grant:
        return self.policy().authenticate(token)


def token_of(metadata: Any) -> str | None:
    """The bearer token in a call's metadata (None: none)."""
    for key, value in metadata or ():
        if key == METADATA_KEY and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer ") :]
    return None


class AuthInterceptor(grpc.ServerInterceptor):
    """Authenticate every call (health excepted), then apply its method's rule."""

    def __init__(self, tokens: PolicyFile, rules: Mapping[str, Rule]) -> None:
        self._tokens = tokens
        self._rules = dict(rules)

    def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = continuation(details)
        method: str = details.method
        if handler is None or method.startswith(EXEMPT_PREFIX):
            return handler
        try:
            grant = self._tokens.authenticate(token_of(details.invocation_metadata))
        except Unauthenticated as exc:
            log.info("refused %s: %s", method, exc)
            return _refuse(handler, exc)
        return _checked(handler, grant, self._rules.get(method, admin_only))


def _refuse(handler: Any, exc: TensorCacheError) -> Any:
    code, message = status_code(exc), str(exc)

    def unary(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(code, message)

    def streaming(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        context.abort(code, message)
        yield  # pragma: no cover  # makes this a generator; abort raises

    if handler.request_streaming and handler.response_streaming:
        return handler._replace(stream_stream=streaming)
    if handler.request_streaming:
        return handler._replace(stream_unary=unary)
    if handler.response_streaming:
        return handler._replace(unary_stream=streaming)
    return handler._replace(unary_unary=unary)


def _checked(handler: Any, grant: Grant, rule: Rule) -> Any:
    def check(request: Any, context: grpc.ServicerContext) -> None:
        try:
            rule(grant, request)
        except TensorCacheError as exc:
            context.abort(status_code(exc), str(exc))

    def first_checked(requests: Iterator[Any]) -> Iterator[Any]:
        # The first message is the header: check it as the servicer reads
        # it; a refusal raises there and the servicer maps it to a status.
        it = iter(requests)
        first = next(it, None)
        if first is None:
            return
        rule(grant, first)
        yield first
        yield from it

    if handler.request_streaming:
        inner = handler.stream_stream if handler.response_streaming else handler.stream_unary

        def streamed(requests: Any, context: grpc.ServicerContext) -> Any:
            return inner(first_checked(requests), context)

        if handler.response_streaming:
            return handler._replace(stream_stream=streamed)
        return handler._replace(stream_unary=streamed)

    inner = handler.unary_stream if handler.response_streaming else handler.unary_unary

    def unary(request: Any, context: grpc.ServicerContext) -> Any:
        check(request, context)
        return inner(request, context)

    if handler.response_streaming:
        return handler._replace(unary_stream=unary)
    return handler._replace(unary_unary=unary)
