"""The cert-manager overlay, run: mutual TLS everywhere, etcd included, on loopback.

test_k8s_smoke.py's harness runs the overlay's own command lines (its etcd
members, routers and nodes) as local processes. cert-manager's Secrets are
stood in for by trustme: one CA per CA Certificate in the render, and each
leaf Certificate issued by its issuerRef's CA with the Certificate's own
names (plus 127.0.0.1, since every pod is on loopback here) into the Secret
it names, as tls.crt, tls.key and ca.crt. Then:

- three etcd members form a cluster over https peer URLs, and a client
  through the router Service puts and gets over mutual TLS;
- the routers keep membership in that etcd: the nodes' records are there,
  read with the routers' etcd client certificate;
- etcd refuses a plaintext client, a TLS client without a certificate, and
  one with a certificate of the cluster's CA (a node's, a worker's: the
  reason for etcd's own CA); its peer port refuses the routers' etcd client
  certificate (--peer-cert-allowed-cn) and admits a member's;
- a renewed member certificate written over the old files is served on the
  next connection, without a restart, and the cluster keeps working.
"""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import Iterator, Mapping
from pathlib import Path

import grpc
import numpy as np
import pytest
import trustme
from aetcd import rpc
from cryptography import x509

import tensorcache
from tensorcache.tls import TLSFiles

from .helpers import assert_same, poll, sample
from .k8s_render import CERT_MANAGER, Obj, by_kind, render
from .test_k8s_smoke import LOOPBACK, LocalPod, World, _component, wait_ready

pytestmark = pytest.mark.integration

Secrets = dict[str, dict[str, bytes]]
# The Secrets this test writes files of, by role.
ETCD_MEMBER = "tensorcache-etcd-tls"
ETCD_CLIENT = "tensorcache-etcd-client-tls"
WORKER = "tensorcache-worker-tls"
ROUTER = "tensorcache-router-tls"


# ------------------------------------------------------------------ cert-manager, stood in for
class StandInIssuers:
    """The render's Issuers and Certificates, issued by trustme."""

    def __init__(self, objects: list[Obj]) -> None:
        certs = by_kind(objects, "Certificate")
        issuers = {i["metadata"]["name"]: i["spec"] for i in by_kind(objects, "Issuer")}
        self.certificates = {c["spec"]["secretName"]: c["spec"] for c in certs}
        # A CA Certificate's Secret -> a trustme CA; a CA Issuer -> that CA.
        ca_of_secret = {
            s: trustme.CA() for s, spec in self.certificates.items() if spec.get("isCA")
        }
        self.cas = {
            name: ca_of_secret[spec["ca"]["secretName"]]
            for name, spec in issuers.items()
            if "ca" in spec
        }

    def issue(self, secret: str) -> dict[str, bytes]:
        """The Secret cert-manager would write for the Certificate naming ``secret``."""
        spec = self.certificates[secret]
        ca = self.cas[spec["issuerRef"]["name"]]
        names = [*spec.get("dnsNames", []), *spec.get("ipAddresses", []), LOOPBACK]
        leaf = ca.issue_cert(*dict.fromkeys(names), common_name=spec.get("commonName"))
        return {
            "tls.crt": b"".join(b.bytes() for b in leaf.cert_chain_pems),
            "tls.key": leaf.private_key_pem.bytes(),
            "ca.crt": ca.cert_pem.bytes(),
        }

    def secrets(self) -> Secrets:
        return {s: self.issue(s) for s, spec in self.certificates.items() if not spec.get("isCA")}


def write_files(secret: Mapping[str, bytes], directory: Path) -> TLSFiles:
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in secret.items():
        (directory / name).write_bytes(data)
    return TLSFiles(
        str(directory / "tls.crt"), str(directory / "tls.key"), str(directory / "ca.crt")
    )


def serial(pem: bytes) -> int:
    return x509.load_pem_x509_certificate(pem).serial_number


# ------------------------------------------------------------------ etcd, as a client sees it
def etcd_call(port: int, creds: grpc.ChannelCredentials | None, call: str) -> object:
    """One etcd call on the client port (MemberList or a full Range), or the gRPC code."""
    target = f"{LOOPBACK}:{port}"
    options = [("grpc.ssl_target_name_override", "tensorcache-etcd")] if creds else []
    channel = (
        grpc.secure_channel(target, creds, options=options)
        if creds
        else grpc.insecure_channel(target)
    )
    with channel:
        try:
            if call == "members":
                return rpc.ClusterStub(channel).MemberList(rpc.MemberListRequest(), timeout=3)
            return rpc.KVStub(channel).Range(
                rpc.RangeRequest(key=b"\0", range_end=b"\0"), timeout=3
            )
        except grpc.RpcError as exc:
            return exc.code()


def served_certificate(port: int, ca: bytes, client: TLSFiles) -> bytes:
    """The certificate etcd presents on a new connection, addressed as the routers do."""
    ctx = ssl.create_default_context(cadata=ca.decode())
    ctx.load_cert_chain(client.cert, client.key)
    with (
        socket.create_connection((LOOPBACK, port), timeout=3) as raw,
        ctx.wrap_socket(raw, server_hostname="tensorcache-etcd") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return ssl.DER_cert_to_PEM_cert(der).encode()


def peer_port_answers(port: int, files: TLSFiles) -> bool:
    """An HTTP request on an etcd peer port with ``files`` as the client
    certificate: True when etcd answers, False when it refuses the certificate
    (TLS 1.3 reports that on the first read, after the handshake)."""
    ctx = ssl.create_default_context(cafile=files.ca)
    ctx.load_cert_chain(files.cert, files.key)
    try:
        with (
            socket.create_connection((LOOPBACK, port), timeout=3) as raw,
            ctx.wrap_socket(raw, server_hostname="tensorcache-etcd") as tls,
        ):
            tls.sendall(b"GET /version HTTP/1.1\r\nHost: etcd\r\nConnection: close\r\n\r\n")
            reply = tls.recv(64)
    except (ssl.SSLError, ConnectionError):
        return False
    return reply.startswith(b"HTTP/1.1 200")


# ------------------------------------------------------------------ the test
@pytest.fixture
def tls_world(tmp_path: Path, etcd_binary: str) -> Iterator[tuple[World, StandInIssuers, Secrets]]:
    objects = render(CERT_MANAGER)
    issuers = StandInIssuers(objects)
    secrets = issuers.secrets()
    w = World(objects, tmp_path, etcd_binary, secrets)
    try:
        yield w, issuers, secrets
    finally:
        w.stop_all()


def test_cert_manager_overlay_runs_with_etcd_over_mutual_tls(
    tls_world: tuple[World, StandInIssuers, Secrets], tmp_path: Path
) -> None:
    world, issuers, secrets = tls_world
    members = _component(world, "etcd")
    routers = _component(world, "router")
    nodes = _component(world, "node")[:3]  # of the prod overlay's six: R = 2 needs two
    assert len(members) == 3 and len(routers) == 2

    # A new etcd cluster is ready only with a quorum: start every member first.
    for m in members:
        world.start(m)
    for m in members:
        wait_ready(m)
    for lp in [*nodes, *routers]:
        world.start(lp)
    for lp in [*routers, *nodes]:
        wait_ready(lp)

    # A worker through the router Service, over mutual TLS.
    worker = write_files(secrets[WORKER], tmp_path / "worker")
    router_port = world.service_port("tensorcache-router", 7070)
    want = {f"tls/{i}": sample("float32", (i * 31 + 1,), seed=i) for i in range(10)}
    with tensorcache.connect(f"{LOOPBACK}:{router_port}", tls=worker) as client:
        poll(
            lambda: (
                sorted(s.name for s in client.stats() if s.reachable) == [n.name for n in nodes]
            ),
            timeout=30,
            what="every started node in the ring",
        )
        client.put_many(want)
        for key, value in want.items():
            assert_same(client.get(key), value)

        _check_etcd(world, members, nodes, secrets, tmp_path)

        # A renewed member certificate, written over the files of the first
        # member (the one behind the Service here): served on the next
        # connection, no restart.
        first = members[0]
        client_files = write_files(secrets[ETCD_CLIENT], tmp_path / "etcd-client")
        ca = secrets[ETCD_MEMBER]["ca.crt"]
        port = first.port("client")
        old = served_certificate(port, ca, client_files)
        assert serial(old) == serial(secrets[ETCD_MEMBER]["tls.crt"])
        renewed = issuers.issue(ETCD_MEMBER)
        mount = first.mounts["/etc/etcd/tls"]
        for name in ("tls.key", "tls.crt"):  # the kubelet swaps them at once; close enough
            staged = mount / f".{name}.new"
            staged.write_bytes(renewed[name])
            os.replace(staged, mount / name)
        poll(
            lambda: (
                serial(served_certificate(port, ca, client_files)) == serial(renewed["tls.crt"])
            ),
            timeout=10,
            what="etcd serving the renewed certificate",
        )
        assert first.alive()
        client.put("tls/after-renewal", np.arange(5))
        assert_same(client.get("tls/after-renewal"), np.arange(5))
        for key, value in want.items():
            assert_same(client.get(key), value)


def _check_etcd(
    world: World, members: list[LocalPod], nodes: list[LocalPod], secrets: Secrets, tmp: Path
) -> None:
    etcd_client = write_files(secrets[ETCD_CLIENT], tmp / "check-etcd-client")
    router_cluster_cert = write_files(secrets[ROUTER], tmp / "check-router")
    ca = secrets[ETCD_MEMBER]["ca.crt"]
    port = world.service_port("tensorcache-etcd", 2379)

    # Three members, each reached by the others at an https peer URL.
    listed = etcd_call(port, etcd_client.channel_credentials(), "members")
    assert not isinstance(listed, grpc.StatusCode), listed
    assert len(listed.members) == 3
    for m in listed.members:
        assert [u.split(":", 1)[0] for u in m.peerURLs] == ["https"], m
        assert [u.split(":", 1)[0] for u in m.clientURLs] == ["https"], m

    # The routers keep membership there: every started node has a record.
    found = etcd_call(port, etcd_client.channel_credentials(), "range")
    assert not isinstance(found, grpc.StatusCode), found
    stored = b"\n".join(kv.key + b"=" + kv.value for kv in found.kvs)
    for n in nodes:
        assert n.name.encode() in stored, f"{n.name} has no record in etcd"

    # Nobody else gets in: no TLS, TLS without a certificate, the cluster CA's certificates.
    refused = {
        "plaintext": None,
        "no client certificate": grpc.ssl_channel_credentials(root_certificates=ca),
        "the cluster CA's router certificate": grpc.ssl_channel_credentials(
            root_certificates=ca,
            private_key=secrets[ROUTER]["tls.key"],
            certificate_chain=secrets[ROUTER]["tls.crt"],
        ),
        "a worker's certificate": grpc.ssl_channel_credentials(
            root_certificates=ca,
            private_key=secrets[WORKER]["tls.key"],
            certificate_chain=secrets[WORKER]["tls.crt"],
        ),
    }
    for who, creds in refused.items():
        answer = etcd_call(port, creds, "range")
        assert answer == grpc.StatusCode.UNAVAILABLE, f"{who}: {answer}"
    assert router_cluster_cert.ca != etcd_client.ca

    # Peer port: members' certificates only, not the routers' etcd client one.
    member = write_files(secrets[ETCD_MEMBER], tmp / "check-member")
    peer = members[1].port("peer")
    assert peer_port_answers(peer, member)
    assert not peer_port_answers(peer, etcd_client)
