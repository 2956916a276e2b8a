"""Mutual TLS on every channel, with certificates made at test time (trustme).

A real cluster (router + nodes as processes, all with --tls-*): clients with
the cluster's CA and a certificate it signed work over every transport; a
plaintext client, one without a certificate, and one whose certificate
another CA signed are refused on the router, the nodes' gRPC ports and the
data channel. Nodes registering with the router and pushing to each other
(replicas=2) prove the server-to-server channels. Rotation and the plaintext
health port are checked on an in-process node (a real gRPC server and data
channel on loopback).
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc

import tensorcache
from tensorcache.apps.cluster import LocalCluster
from tensorcache.authgrpc import Credentials
from tensorcache.dataproto import FRAME, MAGIC, OP_GET, frame
from tensorcache.grpcutil import NodeStub
from tensorcache.node.server import NodeConfig, NodeServer
from tensorcache.proto import tensorcache_pb2 as pb
from tensorcache.tls import TLSFiles

from .helpers import TRANSPORTS, assert_same, poll

pytestmark = pytest.mark.integration


def issue(ca: trustme.CA, directory: Path, name: str) -> TLSFiles:
    """A certificate for loopback signed by ``ca``, written as PEM files."""
    directory.mkdir(parents=True, exist_ok=True)
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    cert, key, ca_path = directory / f"{name}.crt", directory / f"{name}.key", directory / "ca.crt"
    cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_path))
    return TLSFiles(str(cert), str(key), str(ca_path))


def cluster_pki(root: Path) -> dict[str, Any]:
    """A CA, a server and a client certificate it signed, and a foreign CA's one."""
    ca, foreign_ca = trustme.CA(), trustme.CA()
    return {
        "ca": ca,
        "server": issue(ca, root / "cluster", "server"),
        "client": issue(ca, root / "client", "client"),
        "foreign": issue(foreign_ca, root / "foreign", "foreign"),
        "root": root,
    }


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return cluster_pki(tmp_path_factory.mktemp("pki"))


def tls_args(files: TLSFiles) -> list[str]:
    return ["--tls-cert", files.cert, "--tls-key", files.key, "--tls-ca", files.ca]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, pki):
    server = pki["server"]
    c = LocalCluster(
        2,
        capacity="256MiB",
        replicas=2,
        log_dir=tmp_path_factory.mktemp("cluster"),
        # LocalCluster's own ring look-ups use the same files.
        env={
            "TENSORCACHE_TLS_CERT": server.cert,
            "TENSORCACHE_TLS_KEY": server.key,
            "TENSORCACHE_TLS_CA": server.ca,
        },
        node_args=tls_args(server),
        router_args=tls_args(server),
    ).start()
    try:
        yield c
    finally:
        c.stop()


def members(cluster) -> list[pb.Member]:
    return list(cluster.ring().members)


@pytest.mark.parametrize("transport", list(TRANSPORTS))
def test_everything_works_over_mutual_tls(cluster, pki, transport, prefix):
    with tensorcache.connect(
        cluster.router_address, tls=pki["client"], **TRANSPORTS[transport]
    ) as c:
        vals = {f"{prefix}{i}": np.arange(1000 * (i + 1), dtype=np.float32) for i in range(6)}
        vals[prefix + "big"] = np.arange(3_000_000, dtype=np.uint8)
        c.put_many(vals)
        got = c.get_many(list(vals))
        for k, v in vals.items():
            assert_same(got[k], v)
        assert c.delete(prefix + "0")
        c.invalidate(prefix)
        assert c.get(prefix + "1") is None
        # replicas=2: both nodes hold a copy (node-to-node pushes ran over TLS)
        assert sum(s.keys for s in c.stats()) >= 2


@pytest.mark.parametrize("who", ["plaintext", "foreign"])
def test_client_without_the_clusters_certificate_is_refused(cluster, pki, who):
    files = None if who == "plaintext" else pki["foreign"]
    with pytest.raises(tensorcache.Unavailable):
        tensorcache.connect(cluster.router_address, tls=files, timeout_s=3, retries=0)
    for m in members(cluster):
        stub = NodeStub(m.address, Credentials(tls=files))
        with pytest.raises(grpc.RpcError) as err:
            stub.stat(pb.StatRequest(), timeout=3)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        stub.close()


def _data_connection(address: str, ctx: ssl.SSLContext | None) -> socket.socket:
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10)
    return ctx.wrap_socket(sock, server_hostname=host) if ctx else sock


def _get_reply(sock: socket.socket) -> int:
    sock.sendall(
        MAGIC + frame(OP_GET, pb.GetRequest(keys=[pb.EntryKey(key=b"k")]).SerializeToString())
    )
    head = sock.recv(FRAME.size)
    if len(head) < FRAME.size:
        raise ConnectionError("closed without a reply")
    return FRAME.unpack(head)[0]


def test_data_channel_refuses_plaintext_foreign_and_anonymous_clients(cluster, pki):
    data = members(cluster)[0].data_address
    assert _get_reply(_data_connection(data, pki["client"].client_context())) == 0
    anonymous = ssl.create_default_context(cafile=pki["client"].ca)  # no client certificate
    contexts = {
        "plaintext": None,
        "foreign": pki["foreign"].client_context(),
        "anonymous": anonymous,
    }
    for who, ctx in contexts.items():
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            _get_reply(_data_connection(data, ctx))
            pytest.fail(f"the data channel answered a {who} client")


def test_foreign_ca_cannot_pose_as_a_node(cluster, pki):
    """A client holding the cluster's CA refuses a server with another CA's certificate."""
    fake = NodeServer(NodeConfig(name="impostor", tls=pki["foreign"], local_readers=False)).start()
    try:
        stub = NodeStub(fake.address, Credentials(tls=pki["client"]))
        with pytest.raises(grpc.RpcError) as err:
            stub.stat(pb.StatRequest(), timeout=3)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        stub.close()
        with pytest.raises(ssl.SSLError):
            _data_connection(fake.data_address, pki["client"].client_context())
    finally:
        fake.stop(grace=0)


# ------------------------------------------------------------ one node in-process
def _serial(address: str, ctx: ssl.SSLContext) -> int:
    with _data_connection(address, ctx) as s:
        der = s.getpeercert(binary_form=True)
    from cryptography import x509

    return x509.load_der_x509_certificate(der).serial_number


def test_rotation_without_restart_and_plaintext_health(pki, tmp_path):
    files = issue(pki["ca"], tmp_path / "node", "node")
    node = NodeServer(NodeConfig(name="rot", tls=files, local_readers=False, health_port=0)).start()
    try:
        ctx = pki["client"].client_context()
        ctx_h2 = pki["client"].client_context()
        ctx_h2.set_alpn_protocols(["h2"])
        before = {a: _serial(a, c) for a, c in ((node.data_address, ctx), (node.address, ctx_h2))}
        assert len(set(before.values())) == 1
        # Health stays plaintext (Kubernetes' probes cannot speak TLS).
        with grpc.insecure_channel(f"127.0.0.1:{node.health_port}") as ch:
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        # The main port is not.
        with grpc.insecure_channel(node.address) as ch, pytest.raises(grpc.RpcError):
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=3)
        # Rotate: a new certificate (new serial) written over the same files.
        new = issue(pki["ca"], tmp_path / "new", "node")
        Path(files.key).write_bytes(Path(new.key).read_bytes())
        Path(files.cert).write_bytes(Path(new.cert).read_bytes())
        for address, c in ((node.data_address, ctx), (node.address, ctx_h2)):
            poll(
                lambda a=address, c=c: _serial(a, c) != before[a],
                timeout=30,
                what=f"{address} to present the rotated certificate",
            )
        # And the node still serves a TLS client after the rotation.
        stub = NodeStub(node.address, Credentials(tls=pki["client"]))
        assert stub.stat(pb.StatRequest(), timeout=5).name == "rot"
        stub.close()
    finally:
        node.stop(grace=0)


def test_a_peer_name_is_checked_instead_of_the_address(pki, tmp_path):
    """Routers relay to each other's pod IPs, which cert-manager cannot put in a
    certificate: with --tls-peer-name they check a DNS name the certificate
    carries instead (Credentials.server_name). Without it, the IP is checked."""
    directory = tmp_path / "named"
    directory.mkdir()
    leaf = pki["ca"].issue_cert("tensorcache-router")  # a DNS name only, no IP
    cert, key = directory / "r.crt", directory / "r.key"
    cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    files = TLSFiles(str(cert), str(key), pki["server"].ca)
    server = NodeServer(NodeConfig(name="named", tls=files, data_port=None)).start()
    try:
        by_ip = NodeStub(server.address, Credentials(tls=pki["client"]))
        with pytest.raises(grpc.RpcError) as err:
            by_ip.stat(pb.StatRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        by_ip.close()
        named = Credentials(tls=pki["client"], server_name="tensorcache-router")
        stub = NodeStub(server.address, named)
        assert stub.stat(pb.StatRequest(), timeout=5).name == "named"
        stub.close()
        wrong = NodeStub(server.address, Credentials(tls=pki["client"], server_name="other"))
        with pytest.raises(grpc.RpcError):
            wrong.stat(pb.StatRequest(), timeout=5)
        wrong.close()
    finally:
        server.stop(grace=0)
