"""A router picks up renewed etcd certificates when its connection to etcd breaks.

The router reads --etcd-cert/--etcd-key/--etcd-ca when it builds its etcd
client: at start and after every watch failure (router/etcd_conn.py). Here
the files are replaced while etcd is down, and etcd comes back trusting only
a new CA with a certificate of that CA (a CA rotation, the harshest
renewal): the credentials the router started with are now refused both
ways, so the router works again only if it read the new files. It must do
so by itself, with no restart: invalidations (etcd transactions) succeed
again, and a node that joins afterwards gets a record in etcd.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import trustme
from aetcd import rpc

import tensorcache
from tensorcache.apps import parentdeath
from tensorcache.apps.cluster import LocalCluster
from tensorcache.apps.etcdserver import free_port
from tensorcache.errors import Unavailable
from tensorcache.tls import TLSFiles

from .helpers import assert_same, poll
from .test_tls import issue

pytestmark = pytest.mark.integration


@dataclass
class TLSEtcd:
    """A private etcd on https, client certificates required, restartable on its port."""

    binary: str
    files: TLSFiles
    data: Path
    log: Path
    port: int
    peer_port: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self, client: TLSFiles) -> None:
        peer = f"http://127.0.0.1:{self.peer_port}"
        with open(self.log, "ab") as log:
            self.proc = parentdeath.popen(
                [
                    self.binary,
                    "--name=tc",
                    f"--data-dir={self.data}",
                    f"--listen-client-urls={self.url}",
                    f"--advertise-client-urls={self.url}",
                    f"--listen-peer-urls={peer}",
                    f"--initial-advertise-peer-urls={peer}",
                    f"--initial-cluster=tc={peer}",
                    "--client-cert-auth",
                    f"--trusted-ca-file={self.files.ca}",
                    f"--cert-file={self.files.cert}",
                    f"--key-file={self.files.key}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        poll(
            lambda: self._answers(client),
            timeout=30,
            interval=0.1,
            what="etcd answering over TLS",
        )

    def _answers(self, client: TLSFiles) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            pytest.fail(f"etcd exited:\n{self.log.read_text(errors='replace')[-2000:]}")
        return status(self.port, client) is None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def status(port: int, files: TLSFiles) -> grpc.StatusCode | None:
    """None when etcd answers a Status call made with ``files``, else the gRPC code."""
    with grpc.secure_channel(f"127.0.0.1:{port}", files.channel_credentials()) as channel:
        try:
            rpc.MaintenanceStub(channel).Status(rpc.StatusRequest(), timeout=2)
        except grpc.RpcError as exc:
            return exc.code()  # type: ignore[no-any-return]
    return None


@pytest.fixture
def etcd(etcd_binary: str, tmp_path: Path) -> Iterator[tuple[TLSEtcd, trustme.CA]]:
    ca = trustme.CA()
    server = TLSEtcd(
        etcd_binary,
        issue(ca, tmp_path / "etcd-tls", "etcd"),
        tmp_path / "etcd-data",
        tmp_path / "etcd.log",
        free_port(),
        free_port(),
    )
    try:
        yield server, ca
    finally:
        server.stop()


def test_router_rereads_renewed_etcd_files_after_etcd_comes_back(
    etcd: tuple[TLSEtcd, trustme.CA], tmp_path: Path
) -> None:
    server, old_ca = etcd
    router_files = issue(old_ca, tmp_path / "router-etcd-tls", "router")
    server.start(router_files)
    with LocalCluster(
        2,
        capacity="64MiB",
        etcd=server.url,
        log_dir=tmp_path / "logs",
        router_args=[
            *("--etcd-cert", router_files.cert, "--etcd-key", router_files.key),
            *("--etcd-ca", router_files.ca),
        ],
    ) as cluster:
        with tensorcache.connect(cluster.router_address) as client:
            client.put("rot/a", np.arange(8))
            assert client.invalidate("rot/") > 0  # through etcd

            # etcd goes down; both sides' files are renewed from a new CA
            # (the same paths, as the kubelet swaps a Secret's files); etcd
            # comes back trusting only the new CA.
            old = tmp_path / "old-router-files"
            shutil.copytree(Path(router_files.cert).parent, old)
            server.stop()
            new_ca = trustme.CA()
            issue(new_ca, Path(server.files.cert).parent, "etcd")
            issue(new_ca, Path(router_files.cert).parent, "router")
            server.start(router_files)
            stale = TLSFiles(str(old / "router.crt"), str(old / "router.key"), str(old / "ca.crt"))
            assert status(server.port, stale) == grpc.StatusCode.UNAVAILABLE

            def invalidated() -> bool:
                try:
                    return client.invalidate("rot/") > 0
                except Unavailable:
                    return False

            poll(invalidated, timeout=60, interval=0.2, what="an invalidation through etcd")
            cluster.add_node("late")  # registers through the router into etcd
            assert sorted(s.name for s in client.stats() if s.reachable) == sorted(cluster.nodes)
            client.put("rot/b", np.arange(3))
            assert_same(client.get("rot/b"), np.arange(3))
        routers = [p for p in (tmp_path / "logs").glob("*.log") if "router" in p.name]
        assert routers and "watch failed" in "".join(p.read_text() for p in routers)
