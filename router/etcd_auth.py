"""Credentials for etcd, kept apart from router/etcd_conn.py so the config needs no aetcd."""

from __future__ import annotations

from dataclasses import dataclass, field

from tensorcache.tls import TLSFiles

ETCD_PASSWORD_ENV = "TENSORCACHE_ETCD_PASSWORD"


@dataclass(frozen=True)
class EtcdAuth:
    """How the router proves itself to etcd: TLS (an https:// URL) and/or a user.

    ``tls``: the CA that signed etcd's certificate, and this router's client
    certificate for ``etcd --client-cert-auth`` (signed by etcd's CA, which
    may differ from the cluster's own). ``user``/``password``:
    etcd's role-based auth (``etcdctl auth enable``); the password never
    appears in a repr, a log or on a command line (TENSORCACHE_ETCD_PASSWORD).
    """

    tls: TLSFiles | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if (self.user is None) != (self.password is None):
            raise ValueError("etcd user and password go together")
