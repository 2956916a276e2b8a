"""Credentials for etcd, kept apart from router/etcd_conn.py so the config needs no aetcd."""

from __future__ import annotations

import argparse
import os
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


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The etcd credential flags, as every command that talks to etcd takes them."""
    p.add_argument("--etcd-cert", default=None, help="client certificate for etcd (PEM)")
    p.add_argument("--etcd-key", default=None, help="its private key (PEM)")
    p.add_argument(
        "--etcd-ca",
        default=None,
        help="CA of etcd's certificate (PEM); needed with an https:// --etcd URL",
    )
    p.add_argument(
        "--etcd-user",
        default=None,
        help=f"etcd user (role-based auth); its password from ${ETCD_PASSWORD_ENV}",
    )


def from_args(args: argparse.Namespace) -> EtcdAuth | None:
    """The credentials ``add_arguments``' flags name (None: plain http, no user)."""
    files = TLSFiles.all_or_none(
        [args.etcd_cert, args.etcd_key, args.etcd_ca],
        "--etcd-cert, --etcd-key and --etcd-ca go together",
    )
    password = os.environ.get(ETCD_PASSWORD_ENV) if args.etcd_user else None
    if args.etcd_user and not password:
        raise ValueError(f"--etcd-user needs ${ETCD_PASSWORD_ENV}")
    if files is None and not args.etcd_user:
        return None
    return EtcdAuth(files, args.etcd_user, password)
