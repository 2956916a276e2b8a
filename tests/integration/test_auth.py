"""Tokens and per-namespace grants on a real cluster (router + nodes started with --auth-tokens).

Every operation is tried inside and outside its grant on every door: the
client API over each transport (co-located, data channel, gRPC), raw gRPC
calls to a node and the router, and raw data-channel connections. Refusals
must be typed (Unauthenticated / PermissionDenied, the gRPC statuses
UNAUTHENTICATED / PERMISSION_DENIED) and name the prefixes granted; no
token may ever appear in a log.
"""

from __future__ import annotations

import json
import secrets
import socket
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import tensorcache
from tensorcache.apps.cluster import LocalCluster
from tensorcache.auth import token_digest
from tensorcache.authgrpc import Credentials
from tensorcache.dataproto import FRAME, MAGIC, OP_AUTH, OP_DELETE, OP_FILL, OP_GET, frame
from tensorcache.grpcutil import CHANNEL_OPTIONS, NodeStub
from tensorcache.proto import tensorcache_pb2 as pb
from tensorcache.proto import tensorcache_pb2_grpc as pb_grpc
from tensorcache.wire import ring_from_snapshot

from .helpers import TRANSPORTS, assert_same, poll, tensor_header

pytestmark = pytest.mark.integration

TOKENS = {name: secrets.token_urlsafe(32) for name in ("admin", "team-a", "reader-a", "team-b")}


def _tokens_doc(extra: list[dict] | None = None, drop: str = "") -> dict:
    entries = [
        # The cluster's own token, by hash: the file then holds no secret for it.
        {
            "name": "admin",
            "sha256": token_digest(TOKENS["admin"]),
            "prefixes": [""],
            "ops": ["admin"],
        },
        {
            "name": "team-a",
            "token": TOKENS["team-a"],
            "prefixes": ["team-a/"],
            "ops": ["read", "write", "invalidate"],
        },
        {"name": "reader-a", "token": TOKENS["reader-a"], "prefixes": ["team-a/"], "ops": ["read"]},
        {
            "name": "team-b",
            "token": TOKENS["team-b"],
            "prefixes": ["team-b/"],
            "ops": ["read", "write"],
        },
    ]
    return {"tokens": [e for e in entries if e["name"] != drop] + (extra or [])}


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("auth") / "tokens.json"
    path.write_text(json.dumps(_tokens_doc()))
    return path


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tokens_file):
    args = ["--auth-tokens", str(tokens_file)]
    c = LocalCluster(
        2,
        capacity="256MiB",
        log_dir=tmp_path_factory.mktemp("cluster"),
        env={"TENSORCACHE_TOKEN": TOKENS["admin"]},
        node_args=args,
        router_args=args,
    ).start()
    try:
        yield c
    finally:
        c.stop()


def connect(cluster, who: str | None, **options) -> tensorcache.Client:
    token = TOKENS.get(who, who) if who is not None else None
    return tensorcache.connect(cluster.router_address, token=token, **options)


def node_addresses(cluster) -> list[tuple[str, str]]:
    return [(m.address, m.data_address) for m in cluster.ring().members]


# ------------------------------------------------------------ authentication
@pytest.mark.parametrize("who", [None, "not-a-known-token-at-all"], ids=["none", "unknown"])
def test_no_or_unknown_token_is_unauthenticated(cluster, who, monkeypatch):
    monkeypatch.delenv("TENSORCACHE_TOKEN", raising=False)
    with pytest.raises(tensorcache.Unauthenticated):
        connect(cluster, who, timeout_s=10)
    for address, _ in node_addresses(cluster):
        stub = NodeStub(address, Credentials(who))
        with pytest.raises(grpc.RpcError) as err:
            stub.stat(pb.StatRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        stub.close()


def test_token_from_the_environment(cluster, monkeypatch):
    monkeypatch.setenv("TENSORCACHE_TOKEN", TOKENS["team-a"])
    with tensorcache.connect(cluster.router_address) as c:
        c.put("team-a/env", np.arange(3))
        assert_same(c.get("team-a/env"), np.arange(3))


def test_health_needs_no_token(cluster):
    for address, _ in node_addresses(cluster):
        with grpc.insecure_channel(address) as ch:
            reply = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


# ------------------------------------------------------------ grants, client API
@pytest.fixture(params=list(TRANSPORTS))
def team_a(cluster, request):
    with connect(cluster, "team-a", **TRANSPORTS[request.param]) as c:
        yield c


def test_inside_the_grant_everything_works(team_a, prefix):
    key = f"team-a/{prefix}"
    vals = {f"{key}{i}": np.full(1000 + i, i, dtype=np.float32) for i in range(8)}
    team_a.put_many(vals)
    got = team_a.get_many(list(vals))
    for k, v in vals.items():
        assert_same(got[k], v)
    big = np.arange(3_000_000, dtype=np.uint8)  # striped? not at 8 MiB; large enough for bulk paths
    team_a.put(key + "big", big)
    assert_same(team_a.get(key + "big"), big)
    assert team_a.delete(key + "0")
    assert team_a.get(key + "0") is None


def test_outside_the_grant_is_permission_denied_naming_the_prefix(cluster, team_a, prefix):
    with connect(cluster, "team-b") as b:
        b.put(f"team-b/{prefix}x", np.arange(4))
    with pytest.raises(tensorcache.PermissionDenied, match=r"team-a/"):
        team_a.get(f"team-b/{prefix}x")
    with pytest.raises(tensorcache.PermissionDenied, match=r"team-a/"):
        team_a.put(f"team-b/{prefix}x", np.arange(5))
    with pytest.raises(tensorcache.PermissionDenied):
        team_a.delete(f"team-b/{prefix}x")
    with connect(cluster, "admin") as admin:  # still there, unchanged
        assert_same(admin.get(f"team-b/{prefix}x"), np.arange(4))


def test_batches_check_every_key(cluster, team_a, prefix):
    own = {f"team-a/{prefix}{i}": np.arange(i + 1) for i in range(20)}
    foreign = f"team-b/{prefix}sneaky"
    with pytest.raises(tensorcache.PermissionDenied):
        team_a.put_many({**own, foreign: np.arange(3)})
    with pytest.raises(tensorcache.PermissionDenied):
        team_a.get_many([*own, foreign])
    with connect(cluster, "admin") as admin:
        assert admin.get(foreign) is None


def test_read_only_grant(cluster, prefix):
    key = f"team-a/{prefix}ro"
    with connect(cluster, "team-a") as a:
        a.put(key, np.arange(7))
    with connect(cluster, "reader-a") as r:
        assert_same(r.get(key), np.arange(7))
        with pytest.raises(tensorcache.PermissionDenied, match="may not write"):
            r.put(key, np.arange(8))
        with pytest.raises(tensorcache.PermissionDenied, match="may not write"):
            r.delete(key)
        with pytest.raises(tensorcache.PermissionDenied, match="may not invalidate"):
            r.invalidate("team-a/")


def test_invalidate_only_inside_the_grant(cluster, prefix):
    with connect(cluster, "team-a") as a:
        a.put(f"team-a/{prefix}v", np.arange(2))
        a.invalidate(f"team-a/{prefix}")
        assert a.get(f"team-a/{prefix}v") is None
        for bad in ("team-b/", "", "team-a"):
            with pytest.raises(tensorcache.PermissionDenied, match="invalidate"):
                a.invalidate(bad)


def test_watch_needs_read_on_every_key(cluster, prefix):
    """Watch streams every key's events: a grant of "" only. A narrower client in
    watch mode is refused the stream and stays in strict mode (still coherent)."""
    for who, code in (("team-a", grpc.StatusCode.PERMISSION_DENIED), ("admin", None)):
        with Credentials(TOKENS[who]).channel(cluster.router_address, CHANNEL_OPTIONS) as ch:
            stream = pb_grpc.RouterStub(ch).Watch(pb.WatchRequest(), timeout=10)
            if code is None:
                assert next(stream).reset  # the first message of every stream
                stream.cancel()
                continue
            with pytest.raises(grpc.RpcError) as err:
                next(stream)
            assert err.value.code() == code
    key = f"team-a/{prefix}w"
    with connect(cluster, "team-a", near_cache="1MiB", near_cache_mode="watch") as c:
        c.put(key, np.arange(3))
        assert_same(c.get(key), np.arange(3))
        with connect(cluster, "team-a") as other:
            other.put(key, np.arange(4))
        assert_same(c.get(key), np.arange(4))  # revalidated: no stale hit


# ------------------------------------------------------------ raw doors
def test_node_only_operations_need_admin(cluster):
    address, _ = node_addresses(cluster)[0]
    stub = NodeStub(address, Credentials(TOKENS["team-a"]))
    calls = {
        "handoff get": lambda: list(
            stub.get(pb.GetRequest(keys=[pb.EntryKey(key=b"team-a/x")], handoff=True), timeout=10)
        ),
        "versioned push": lambda: stub.put(
            iter([_push_header(b"team-a/pushed"), b"x"]), timeout=10
        ),
    }
    for what, call in calls.items():
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, what
        assert "team-a" in err.value.details()
    stub.close()
    creds = Credentials(TOKENS["team-a"])
    with (
        creds.channel(cluster.router_address, CHANNEL_OPTIONS) as ch,
        pytest.raises(grpc.RpcError) as err,
    ):
        pb_grpc.RouterStub(ch).Register(
            pb.RegisterRequest(member=pb.Member(name="evil", address="127.0.0.1:1")),
            timeout=10,
        )
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def _push_header(key: bytes) -> bytes:
    req = pb.PutRequest.FromString(tensor_header(key, b"x"))
    req.entries[0].version = 12345
    return req.SerializeToString()


def _data_exchange(data_address: str, stream: bytes) -> tuple[int, pb.DataError | None]:
    host, port = data_address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(stream)
        head = b""
        while len(head) < FRAME.size:
            got = s.recv(FRAME.size - len(head))
            assert got, "the node closed without an answer"
            head += got
        status, n = FRAME.unpack(head)
        body = b""
        while len(body) < n:
            body += s.recv(n - len(body))
    return status, (pb.DataError.FromString(body) if status else None)


def test_data_channel_authenticates_its_connection(cluster):
    _, data = node_addresses(cluster)[0]
    get = frame(OP_GET, pb.GetRequest(keys=[pb.EntryKey(key=b"team-a/x")]).SerializeToString())
    unauth = grpc.StatusCode.UNAUTHENTICATED.value[0]
    status, err = _data_exchange(data, MAGIC + get)
    assert status == unauth and "token" in err.message
    status, err = _data_exchange(data, MAGIC + frame(OP_AUTH, b"wrong-token-xxxxxxxx") + get)
    assert status == unauth and "not known" in err.message
    # Before it authenticates, a peer may not make the node hold a large header.
    status, err = _data_exchange(data, MAGIC + FRAME.pack(OP_AUTH, 1 << 20))
    assert status == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "4096-byte limit" in err.message
    auth = frame(OP_AUTH, TOKENS["team-a"].encode())
    assert _data_exchange(data, MAGIC + auth + get)[0] == 0
    foreign = frame(OP_GET, pb.GetRequest(keys=[pb.EntryKey(key=b"team-b/x")]).SerializeToString())
    status, err = _data_exchange(data, MAGIC + auth + foreign)
    assert status == grpc.StatusCode.PERMISSION_DENIED.value[0] and "team-a/" in err.message


def test_data_channel_deletes_and_fills_check_the_grant(cluster, prefix):
    """DELETE and FILL on the data channel obey the token's grant exactly as the gRPC
    methods do; a refusal is PERMISSION_DENIED and leaves the connection usable."""
    key = f"team-a/{prefix}ctl"
    with connect(cluster, "team-a") as a:
        a.put(key, np.arange(3))
    with connect(cluster, "reader-a", local_fastpath=False) as r:
        assert r.version(key) is not None  # reading versions: allowed
        with pytest.raises(tensorcache.PermissionDenied, match="may not write"):
            r.delete(key)
        with pytest.raises(tensorcache.PermissionDenied, match="may not write"):
            r.get_or_load(f"team-a/{prefix}fill", lambda: np.arange(2))
        assert r.metrics().get("data_fallbacks", 0) == 0  # refused on the data channel itself
    data = ring_from_snapshot(cluster.ring()).owner(key).data_address
    delete = frame(
        OP_DELETE, pb.DeleteRequest(keys=[pb.EntryKey(key=key.encode())]).SerializeToString()
    )
    fill = frame(
        OP_FILL, pb.FillRequest(key=key.encode(), holder="h", ttl_ms=1000).SerializeToString()
    )
    head = frame(
        OP_GET,
        pb.GetRequest(keys=[pb.EntryKey(key=key.encode())], head_only=True).SerializeToString(),
    )
    denied = grpc.StatusCode.PERMISSION_DENIED.value[0]
    host, port = data.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(MAGIC + frame(OP_AUTH, TOKENS["reader-a"].encode()) + delete + fill + head)
        replies = [_read_reply(s) for _ in range(3)]
    assert [status for status, _ in replies] == [denied, denied, 0]
    for _, body in replies[:2]:
        assert "may not write" in pb.DataError.FromString(body).message
    # The same connection, still in step: the version check behind them is answered.
    assert pb.GetReply.FromString(replies[2][1]).entries[0].found
    # team-a may not touch team-b's keys there either.
    foreign = frame(
        OP_DELETE, pb.DeleteRequest(keys=[pb.EntryKey(key=b"team-b/x")]).SerializeToString()
    )
    status, err = _data_exchange(data, MAGIC + frame(OP_AUTH, TOKENS["team-a"].encode()) + foreign)
    assert status == denied and err is not None and "team-a/" in err.message
    with connect(cluster, "team-a") as a:
        assert_same(a.get(key), np.arange(3))


def _read_reply(s: socket.socket) -> tuple[int, bytes]:
    def exact(n: int) -> bytes:
        out = b""
        while len(out) < n:
            got = s.recv(n - len(out))
            assert got, "the node closed without an answer"
            out += got
        return out

    status, n = FRAME.unpack(exact(FRAME.size))
    return status, exact(n)


# ------------------------------------------------------------ rotation, logs
def test_tokens_file_changes_apply_without_restart(cluster, tokens_file, prefix):
    new = secrets.token_urlsafe(32)
    extra = [{"name": "team-c", "token": new, "prefixes": ["team-c/"], "ops": ["read", "write"]}]
    try:
        tokens_file.write_text(json.dumps(_tokens_doc(extra, drop="team-b")))

        def new_works() -> bool:
            try:
                with connect(cluster, new, retries=0) as c:
                    c.put(f"team-c/{prefix}", np.arange(3))
                return True
            except tensorcache.Unauthenticated:
                return False

        poll(new_works, timeout=30, what="the added token to be accepted")

        def revoked() -> bool:
            try:
                with connect(cluster, "team-b", retries=0) as b:
                    b.get(f"team-b/{prefix}")
                return False
            except tensorcache.Unauthenticated:
                return True

        poll(revoked, timeout=30, what="the removed token to be refused")
    finally:
        tokens_file.write_text(json.dumps(_tokens_doc()))


def test_no_token_in_any_log(cluster):
    logs = "".join(p.read_text(errors="replace") for p in cluster.log_dir.glob("*.log"))
    assert logs, "expected the processes' logs"
    for name, token in TOKENS.items():
        assert token not in logs, f"the {name} token appears in a log"
