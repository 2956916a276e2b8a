"""The router's etcd connection over TLS with client certificates, and etcd user auth.

A private ``etcd --client-cert-auth`` serving https only, with certificates
made at test time (trustme) and role-based auth enabled (user root). A real
cluster keeps its membership there through ``--etcd https://... --etcd-cert
--etcd-key --etcd-ca --etcd-user`` (password from the environment); a router
with another CA's certificate, or the wrong password, gets no membership.
"""

from __future__ import annotations

import secrets
import subprocess
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import trustme
from aetcd import rpc

import tensorcache
from tensorcache.apps.cluster import LocalCluster
from tensorcache.apps.etcdserver import free_port
from tensorcache.errors import Unavailable
from tensorcache.router.etcd_auth import EtcdAuth
from tensorcache.router.etcd_membership import EtcdMembership

from .helpers import assert_same
from .test_tls import issue

pytestmark = pytest.mark.integration

PASSWORD = secrets.token_urlsafe(16)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("etcd-pki")
    ca = trustme.CA()
    return {
        "etcd": issue(ca, root / "etcd", "etcd"),
        "router": issue(ca, root / "router", "router"),
        "foreign": issue(trustme.CA(), root / "foreign", "foreign"),
    }


@pytest.fixture(scope="module")
def etcd(etcd_binary, pki, tmp_path_factory):
    """https://127.0.0.1:PORT, client certificates required, auth enabled (user root)."""
    tmp = tmp_path_factory.mktemp("etcd")
    server = pki["etcd"]
    client, peer = free_port(), free_port()
    url, peer_url = f"https://127.0.0.1:{client}", f"http://127.0.0.1:{peer}"
    log = open(tmp / "etcd.log", "wb")  # noqa: SIM115  # closed in the finally below
    proc = subprocess.Popen(
        [
            etcd_binary,
            "--name=tc",
            f"--data-dir={tmp / 'data'}",
            f"--listen-client-urls={url}",
            f"--advertise-client-urls={url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=tc={peer_url}",
            "--client-cert-auth",
            f"--trusted-ca-file={server.ca}",
            f"--cert-file={server.cert}",
            f"--key-file={server.key}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        creds = pki["router"].channel_credentials()
        with grpc.secure_channel(url.removeprefix("https://"), creds) as ch:
            deadline = time.monotonic() + 30
            while True:
                try:
                    rpc.MaintenanceStub(ch).Status(rpc.StatusRequest(), timeout=1)
                    break
                except grpc.RpcError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        pytest.fail(f"etcd did not start: {(tmp / 'etcd.log').read_text()[-2000:]}")
                    time.sleep(0.1)
            auth = rpc.AuthStub(ch)
            auth.UserAdd(rpc.AuthUserAddRequest(name="root", password=PASSWORD), timeout=5)
            auth.UserGrantRole(rpc.AuthUserGrantRoleRequest(user="root", role="root"), timeout=5)
            auth.AuthEnable(rpc.AuthEnableRequest(), timeout=5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def etcd_args(files) -> list[str]:
    return ["--etcd-cert", files.cert, "--etcd-key", files.key, "--etcd-ca", files.ca]


def test_cluster_membership_in_etcd_over_tls_with_user_auth(etcd, pki, tmp_path):
    with LocalCluster(
        2,
        capacity="128MiB",
        etcd=etcd,
        log_dir=tmp_path,
        router_args=[*etcd_args(pki["router"]), "--etcd-user", "root"],
        env={"TENSORCACHE_ETCD_PASSWORD": PASSWORD},
    ) as cluster:
        with tensorcache.connect(cluster.router_address) as c:
            c.put("etcd-tls/x", np.arange(10))
            assert_same(c.get("etcd-tls/x"), np.arange(10))
            assert c.invalidate("etcd-tls/") > 0  # an etcd transaction
        logs = "".join(p.read_text(errors="replace") for p in Path(tmp_path).glob("*.log"))
        assert PASSWORD not in logs


@pytest.mark.parametrize("who", ["foreign-cert", "wrong-password", "no-password"])
def test_etcd_refuses_a_router_without_the_right_credentials(etcd, pki, who):
    auth = {
        "foreign-cert": EtcdAuth(pki["foreign"], "root", PASSWORD),
        "wrong-password": EtcdAuth(pki["router"], "root", PASSWORD + "x"),
        "no-password": EtcdAuth(pki["router"]),
    }[who]
    with pytest.raises(Unavailable):
        EtcdMembership(etcd, 3.0, timeout_s=2.0, startup_timeout_s=4.0, auth=auth).close()


def test_https_etcd_url_needs_the_ca():
    with pytest.raises(ValueError, match="etcd CA"):
        EtcdMembership("https://127.0.0.1:1", 3.0, timeout_s=1.0, startup_timeout_s=1.0)
