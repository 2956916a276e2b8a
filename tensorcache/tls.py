"""Mutual TLS: one set of files per process, on gRPC and the data channel alike.

Every process (node, router, client) holds a certificate and key signed by
the cluster's CA and trusts only that CA. Servers require a client
certificate (``require_client_authentication``; ``CERT_REQUIRED`` on the data
channel), so a plaintext peer or one with a certificate from another CA is
refused at the handshake, before any request is read. A node presents its
own certificate when it calls its router and peers: certificates carry both
the server and client usages (cert-manager's and trustme's do).

Rotation without a restart: servers check the files' modification stamps
when a connection arrives (gRPC through its dynamic server credentials; the
data channel at most once a second) and load them again when they changed.
A half-written pair (key and certificate that do not match yet) is not
taken: the previous one stays until the pair is whole. Clients read the
files when they open a channel or connection.
"""

from __future__ import annotations

import argparse
import logging
import os
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import grpc

log = logging.getLogger("tensorcache.tls")

ENV_CERT, ENV_KEY, ENV_CA = "TENSORCACHE_TLS_CERT", "TENSORCACHE_TLS_KEY", "TENSORCACHE_TLS_CA"
RECHECK_S = 1.0


@dataclass(frozen=True)
class TLSFiles:
    """PEM files: this process's certificate chain, its key, and the CA it trusts."""

    cert: str
    key: str
    ca: str

    def __post_init__(self) -> None:
        for name in ("cert", "key", "ca"):
            value = getattr(self, name)
            if not isinstance(value, str | os.PathLike) or not os.fspath(value):
                raise ValueError(f"tls.{name} must be a file path, got {value!r}")
            object.__setattr__(self, name, os.fspath(value))

    @staticmethod
    def all_or_none(values: Sequence[str | None], error: str) -> TLSFiles | None:
        """Cert, key and CA given together (None: none given); ValueError(error) if some."""
        if not any(values):
            return None
        if not all(values):
            raise ValueError(error)
        cert, key, ca = values
        assert cert and key and ca
        return TLSFiles(cert, key, ca)

    @staticmethod
    def from_env(env: Mapping[str, str] | None = None) -> TLSFiles | None:
        """From TENSORCACHE_TLS_CERT/_KEY/_CA (all three, or none: None)."""
        env = os.environ if env is None else env
        return TLSFiles.all_or_none(
            [env.get(k, "") for k in (ENV_CERT, ENV_KEY, ENV_CA)],
            f"set all of {ENV_CERT}, {ENV_KEY} and {ENV_CA}, or none",
        )

    def stamp(self) -> tuple[int, ...]:
        out: list[int] = []
        for path in (self.cert, self.key, self.ca):
            st = os.stat(path)
            out += [st.st_mtime_ns, st.st_size, st.st_ino]
        return tuple(out)

    def read(self) -> tuple[bytes, bytes, bytes]:
        """(cert chain, key, CA) bytes, checked to be a matching pair."""
        paths = (self.cert, self.key, self.ca)
        cert, key, ca = (open(p, "rb").read() for p in paths)  # noqa: SIM115  # read whole
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_cert_chain(self.cert, self.key)  # raises if they do not match
        ctx.load_verify_locations(cadata=ca.decode("ascii", "replace"))
        return cert, key, ca

    # -- gRPC ------------------------------------------------------------------
    def channel_credentials(self) -> grpc.ChannelCredentials:
        cert, key, ca = self.read()
        return grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=key, certificate_chain=cert
        )

    def server_credentials(self) -> grpc.ServerCredentials:
        """mTLS server credentials that load the files again when they change."""
        cert, key, ca = self.read()
        initial = grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)
        loaded = [self.stamp()]

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            try:
                stamp = self.stamp()
                if stamp == loaded[0]:
                    return None
                cert, key, ca = self.read()
            except (OSError, ssl.SSLError, ValueError) as exc:
                log.warning("TLS files %s not reloaded (keeping the old ones): %s", self.cert, exc)
                return None
            loaded[0] = stamp
            log.info("TLS certificate reloaded from %s", self.cert)
            return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

        return grpc.dynamic_ssl_server_credentials(
            initial,
            fetch,  # type: ignore[arg-type]  # the stubs miss it: None keeps the current config
            require_client_authentication=True,
        )

    # -- data channel --------------------------------------------------------------
    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca)
        ctx.load_cert_chain(self.cert, self.key)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert, self.key)
        ctx.load_verify_locations(cafile=self.ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx


class ReloadingContext:
    """A server SSLContext rebuilt when the files change (checked at most once a second)."""

    def __init__(self, files: TLSFiles, clock: Callable[[], float] = time.monotonic) -> None:
        self._files = files
        self._clock = clock
        self._stamp = files.stamp()
        self._ctx = files.server_context()
        self._checked = clock()
        self._lock = threading.Lock()

    def get(self) -> ssl.SSLContext:
        now = self._clock()
        if now - self._checked < RECHECK_S:
            return self._ctx
        with self._lock:
            self._checked = now
            try:
                stamp = self._files.stamp()
                if stamp != self._stamp:
                    self._files.read()  # a matching pair, or keep the old context
                    self._ctx = self._files.server_context()
                    self._stamp = stamp
                    log.info("data channel TLS certificate reloaded from %s", self._files.cert)
            except (OSError, ssl.SSLError, ValueError) as exc:
                log.warning("data channel TLS files not reloaded (keeping the old): %s", exc)
            return self._ctx


def add_arguments(p: argparse.ArgumentParser) -> None:
    """--tls-cert/--tls-key/--tls-ca, for the node and router commands."""
    p.add_argument("--tls-cert", default=None, help="PEM certificate chain (mutual TLS on)")
    p.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    p.add_argument(
        "--tls-ca",
        default=None,
        help="PEM CA bundle that peers' certificates must chain to; with all three set, "
        "every port but --health-port is mutual TLS (default: $TENSORCACHE_TLS_CERT/_KEY/_CA)",
    )


def from_args(args: argparse.Namespace) -> TLSFiles | None:
    """The files named by the flags (all three, or none: then the environment's)."""
    files = TLSFiles.all_or_none(
        [args.tls_cert, args.tls_key, args.tls_ca], "--tls-cert, --tls-key and --tls-ca go together"
    )
    return files if files is not None else TLSFiles.from_env()
