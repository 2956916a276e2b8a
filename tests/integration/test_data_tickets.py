"""`--data-channel-encryption off`: a plaintext data channel, authenticated by tickets.

A real cluster (router + 2 nodes as processes) with mutual TLS, tokens and
the data channel's encryption off; certificates made at test time
(trustme, as tests/integration/test_tls.py). What must hold:

- clients need no extra setting: the ring says which nodes want tickets, and
  data round-trips over the data channel (no gRPC fallback) and the
  co-located path;
- the data port really is plaintext (a bare TCP connection is answered,
  with a refusal), and a connection is refused without a ticket, with a
  token instead of one, with one replayed from another connection, with a
  forged or altered one, and with an expired one (in-process node, short
  lifetime);
- the token's grant applies through the ticket (a read-only token reads but
  cannot put over the data channel);
- a client whose certificate another CA signed gets no ticket.
"""

from __future__ import annotations

import json
import secrets
import socket
import time

import grpc
import numpy as np
import pytest

import tensorcache
from tensorcache import localread
from tensorcache.apps.cluster import LocalCluster
from tensorcache.authgrpc import Credentials
from tensorcache.client.tickets import connect_ticketed, issuer
from tensorcache.dataproto import FRAME, MAGIC, OP_AUTH, OP_GET, OP_PUT, frame
from tensorcache.grpcutil import NodeStub
from tensorcache.node.server import NodeConfig, NodeServer
from tensorcache.proto import tensorcache_pb2 as pb
from tensorcache.tickets import OP_TICKET

from .helpers import TRANSPORTS, assert_same
from .test_tls import cluster_pki, issue, tls_args

pytestmark = pytest.mark.integration

TOKENS = {name: secrets.token_urlsafe(32) for name in ("admin", "team-a", "reader-a")}
OFF = ["--data-channel-encryption", "off"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return cluster_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, pki):
    server = pki["server"]
    tokens = tmp_path_factory.mktemp("auth") / "tokens.json"
    tokens.write_text(
        json.dumps(
            {
                "tokens": [
                    {"name": "admin", "token": TOKENS["admin"], "prefixes": [""], "ops": ["admin"]},
                    {
                        "name": "team-a",
                        "token": TOKENS["team-a"],
                        "prefixes": ["team-a/"],
                        "ops": ["read", "write", "invalidate"],
                    },
                    {
                        "name": "reader-a",
                        "token": TOKENS["reader-a"],
                        "prefixes": ["team-a/"],
                        "ops": ["read"],
                    },
                ]
            }
        )
    )
    auth = ["--auth-tokens", str(tokens)]
    c = LocalCluster(
        2,
        capacity="256MiB",
        log_dir=tmp_path_factory.mktemp("cluster"),
        env={
            "TENSORCACHE_TOKEN": TOKENS["admin"],
            "TENSORCACHE_TLS_CERT": server.cert,
            "TENSORCACHE_TLS_KEY": server.key,
            "TENSORCACHE_TLS_CA": server.ca,
        },
        # The flag for one node, the environment variable for the other
        # would need per-node env; both spellings are covered: the flag here,
        # the variable in test_the_setting_and_its_errors.
        node_args=[*tls_args(server), *auth, *OFF],
        router_args=[*tls_args(server), *auth],
    ).start()
    try:
        yield c
    finally:
        c.stop()


def members(cluster) -> list[pb.Member]:
    return list(cluster.ring().members)


def ticket_for(member: pb.Member, files, token: str | None):
    """A bound socket and the ticket for it (asked over mTLS gRPC)."""
    stub = NodeStub(member.address, Credentials(token, files))
    host, port = member.data_address.rsplit(":", 1)
    try:
        return connect_ticketed((host, int(port)), 10, issuer(stub.channel, member.address, 10))
    finally:
        stub.close()


def status_of(sock: socket.socket, *frames: bytes) -> tuple[int, bytes]:
    """Send magic + frames; the first reply's (status, header)."""
    sock.settimeout(10)
    sock.sendall(MAGIC + b"".join(frames))
    head = b""
    while len(head) < FRAME.size:
        got = sock.recv(FRAME.size - len(head))
        if not got:
            raise ConnectionError("closed without a reply")
        head += got
    status, length = FRAME.unpack(head)
    body = b""
    while len(body) < length:
        got = sock.recv(length - len(body))
        if not got:
            break
        body += got
    return status, body


def get_frame(key: str) -> bytes:
    return frame(OP_GET, pb.GetRequest(keys=[pb.EntryKey(key=key.encode())]).SerializeToString())


def refusal(sock: socket.socket, *frames: bytes) -> str:
    """The UNAUTHENTICATED refusal's message; the node closes the connection after it."""
    status, body = status_of(sock, *frames)
    assert status == grpc.StatusCode.UNAUTHENTICATED.value[0], (status, body)
    assert sock.recv(1) == b""  # closed
    sock.close()
    return pb.DataError.FromString(body).message


# ------------------------------------------------------------ the cluster
@pytest.mark.parametrize("transport", list(TRANSPORTS))
def test_data_round_trips_with_tickets_and_no_client_setting(cluster, pki, transport, prefix):
    assert all(m.data_ticket and m.data_address for m in members(cluster))
    key = f"team-a/{prefix}"
    with tensorcache.connect(
        cluster.router_address, tls=pki["client"], token=TOKENS["team-a"], **TRANSPORTS[transport]
    ) as c:
        vals = {f"{key}{i}": np.arange(1000 * (i + 1), dtype=np.float32) for i in range(6)}
        vals[key + "big"] = np.arange(3_000_000, dtype=np.uint8)
        c.put_many(vals)
        got = c.get_many(list(vals))
        for k, v in vals.items():
            assert_same(got[k], v)
        m = c.metrics()
        assert m.get("data_fallbacks", 0) == 0  # the data channel carried it, not gRPC
        if transport == "local" and localread.AVAILABLE:
            assert m.get("local_reads", 0) > 0  # the co-located path, after a ticketed Get


def test_the_data_port_is_plaintext_and_needs_a_ticket(cluster, pki):
    m = members(cluster)[0]
    host, port = m.data_address.rsplit(":", 1)
    # A bare TCP connection is read and answered in plaintext: no TLS here.
    message = refusal(
        socket.create_connection((host, int(port)), timeout=10), get_frame("team-a/x")
    )
    assert "needs a ticket" in message
    # A token instead of a ticket: refused, never used (it crossed in the clear).
    sock = socket.create_connection((host, int(port)), timeout=10)
    message = refusal(sock, frame(OP_AUTH, TOKENS["team-a"].encode()))
    assert "needs a ticket" in message
    # With a ticket: answered (status 0) on the same port.
    sock, ticket = ticket_for(m, pki["client"], TOKENS["team-a"])
    with sock:
        assert status_of(sock, frame(OP_TICKET, ticket), get_frame("team-a/x"))[0] == 0


def test_a_replayed_or_forged_ticket_is_refused(cluster, pki):
    m = members(cluster)[0]
    host, port = m.data_address.rsplit(":", 1)
    sock, ticket = ticket_for(m, pki["client"], TOKENS["team-a"])
    with sock:
        assert status_of(sock, frame(OP_TICKET, ticket), get_frame("team-a/x"))[0] == 0
        # Someone who read the ticket off the wire, on their own connection:
        thief = socket.create_connection((host, int(port)), timeout=10)
        assert "issued for a connection from" in refusal(
            thief, frame(OP_TICKET, ticket), get_frame("team-a/x")
        )
    # Forged: one byte of its body or MAC changed.
    for at in (5, -1):
        sock, ticket = ticket_for(m, pki["client"], TOKENS["team-a"])
        bad = bytearray(ticket)
        bad[at] ^= 0x01
        assert "not issued by this node" in refusal(sock, frame(OP_TICKET, bytes(bad)))
    # A ticket for the other node is not this node's either.
    other = members(cluster)[1]
    sock, ticket = ticket_for(other, pki["client"], TOKENS["team-a"])
    sock.close()
    sock, _ = ticket_for(m, pki["client"], TOKENS["team-a"])
    assert "not issued by this node" in refusal(sock, frame(OP_TICKET, ticket))


def test_the_tokens_grant_applies_through_the_ticket(cluster, pki, prefix):
    key = f"team-a/{prefix}"
    with tensorcache.connect(
        cluster.router_address, tls=pki["client"], token=TOKENS["team-a"], local_fastpath=False
    ) as writer:
        writer.put(key, np.arange(10))
    with tensorcache.connect(
        cluster.router_address, tls=pki["client"], token=TOKENS["reader-a"], local_fastpath=False
    ) as reader:
        assert_same(reader.get(key), np.arange(10))
        with pytest.raises(tensorcache.PermissionDenied, match="reader-a"):
            reader.put(key, np.arange(3))
        with pytest.raises(tensorcache.PermissionDenied):
            reader.get("team-b/other")
        assert reader.metrics().get("data_fallbacks", 0) == 0
    # The same on a raw connection: the put is answered PERMISSION_DENIED there.
    m = members(cluster)[0]
    sock, ticket = ticket_for(m, pki["client"], TOKENS["reader-a"])
    put = pb.PutRequest(entries=[pb.EntryPut(key=key.encode(), meta=pb.TensorMeta())])
    with sock:
        status, body = status_of(
            sock, frame(OP_TICKET, ticket), frame(OP_PUT, put.SerializeToString())
        )
    assert status == grpc.StatusCode.PERMISSION_DENIED.value[0]
    assert "reader-a" in pb.DataError.FromString(body).message
    # No token at all: no ticket.
    with pytest.raises(tensorcache.Unauthenticated):
        ticket_for(m, pki["client"], None)


def test_a_foreign_ca_client_gets_no_ticket(cluster, pki):
    m = members(cluster)[0]
    with pytest.raises(tensorcache.Unavailable):
        ticket_for(m, pki["foreign"], TOKENS["team-a"])
    # And a plaintext gRPC client cannot reach the ticket service either.
    with pytest.raises(tensorcache.Unavailable):
        ticket_for(m, None, TOKENS["team-a"])


# ------------------------------------------------------------ one node in-process
def test_an_expired_ticket_is_refused(pki, tmp_path):
    files = issue(pki["ca"], tmp_path / "node", "node")
    node = NodeServer(
        NodeConfig(
            name="short",
            tls=files,
            data_channel_encryption=False,
            data_ticket_ttl_s=0.5,
            local_readers=False,
        )
    ).start()
    try:
        member = pb.Member(address=node.address, data_address=node.data_address)
        sock, ticket = ticket_for(member, pki["client"], None)
        # The ticket's lifetime is the condition under test: wait it out.
        time.sleep(0.6)
        assert "expired" in refusal(sock, frame(OP_TICKET, ticket))
        sock, ticket = ticket_for(member, pki["client"], None)
        with sock:  # a fresh one, used at once: admitted (no tokens on this node)
            assert status_of(sock, frame(OP_TICKET, ticket), get_frame("k"))[0] == 0
    finally:
        node.stop(grace=0)


def test_the_setting_and_its_errors(pki, monkeypatch):
    from tensorcache.node import tickets
    from tensorcache.node.server import add_arguments

    with pytest.raises(ValueError, match="needs TLS"):
        NodeConfig(name="n", data_channel_encryption=False)
    with pytest.raises(ValueError, match="needs TLS"):
        NodeConfig(name="n", data_channel_encryption=True)
    import argparse

    p = argparse.ArgumentParser()
    add_arguments(p)
    assert tickets.from_args(p.parse_args([])) is None
    assert tickets.from_args(p.parse_args(["--data-channel-encryption", "off"])) is False
    monkeypatch.setenv(tickets.ENV, "off")
    assert tickets.from_args(p.parse_args([])) is False
    assert tickets.from_args(p.parse_args(["--data-channel-encryption", "on"])) is True
    monkeypatch.setenv(tickets.ENV, "maybe")
    with pytest.raises(ValueError, match="'on' or 'off'"):
        tickets.from_args(p.parse_args([]))
    # On (the default with TLS): the data channel is TLS and the ring says no tickets.
    node = NodeServer(NodeConfig(name="on", tls=pki["server"], local_readers=False)).start()
    try:
        host, port = node.data_address.rsplit(":", 1)
        with (
            socket.create_connection((host, int(port)), timeout=10) as sock,
            pytest.raises((ConnectionError, OSError)),
        ):
            status_of(sock, get_frame("k"))
            pytest.fail("a TLS data channel answered plaintext")
    finally:
        node.stop(grace=0)
