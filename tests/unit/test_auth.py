"""The access policy (tensorcache/auth.py): the tokens file and what a grant allows."""

from __future__ import annotations

import json

import pytest

from tensorcache.auth import Grant, Policy, check_keys, token_digest
from tensorcache.authgrpc import Credentials, PolicyFile, token_of
from tensorcache.errors import PermissionDenied, Unauthenticated

pytestmark = pytest.mark.unit

TOKEN_A = "a" * 32
TOKEN_ADMIN = "z" * 40


def policy() -> Policy:
    return Policy.from_mapping(
        {
            "tokens": [
                {"name": "a", "token": TOKEN_A, "prefixes": ["a/", "shared/"], "ops": ["read"]},
                {
                    "name": "ops",
                    "sha256": token_digest(TOKEN_ADMIN),
                    "prefixes": [],
                    "ops": ["admin"],
                },
            ]
        }
    )


def test_authenticate_by_token_or_its_hash():
    p = policy()
    assert p.authenticate(TOKEN_A).name == "a"
    assert p.authenticate(TOKEN_ADMIN.encode()).name == "ops"
    with pytest.raises(Unauthenticated, match="no token"):
        p.authenticate(None)
    with pytest.raises(Unauthenticated, match="not known"):
        p.authenticate("b" * 32)


def test_grant_checks_prefix_and_operation():
    a = policy().authenticate(TOKEN_A)
    a.check("read", "a/x")
    a.check("read", "shared/y")
    with pytest.raises(PermissionDenied, match=r"may not read 'b/x'.*\['a/', 'shared/'\]"):
        a.check("read", "b/x")
    with pytest.raises(PermissionDenied, match="may not write"):
        a.check("write", "a/x")
    with pytest.raises(PermissionDenied, match="may not admin"):
        a.require("admin")
    with pytest.raises(PermissionDenied, match="'b/2'"):
        check_keys(a, "read", ["a/1", "b/2", "a/3"])


def test_admin_may_do_everything():
    ops = policy().authenticate(TOKEN_ADMIN)
    for op in ("read", "write", "invalidate", "admin"):
        ops.check(op, "anything/at/all")
    ops.require("admin")


def test_empty_prefix_covers_every_key():
    g = Grant("all", ("",), frozenset({"read"}))
    assert g.allows("read", "x") and g.allows("read", "")


@pytest.mark.parametrize(
    ("doc", "problem"),
    [
        ([], "list 'tokens'"),
        ({"tokens": [{"token": TOKEN_A, "prefixes": [], "ops": ["read"]}]}, "name"),
        ({"tokens": [{"name": "x", "prefixes": [], "ops": ["read"]}]}, "exactly one"),
        ({"tokens": [{"name": "x", "token": "short", "prefixes": [], "ops": ["read"]}]}, ">= 16"),
        ({"tokens": [{"name": "x", "sha256": "zz", "prefixes": [], "ops": ["read"]}]}, "64 hex"),
        ({"tokens": [{"name": "x", "token": TOKEN_A, "prefixes": "a/", "ops": ["read"]}]}, "list"),
        ({"tokens": [{"name": "x", "token": TOKEN_A, "prefixes": [], "ops": ["rw"]}]}, "'rw'"),
        ({"tokens": [{"name": "x", "token": TOKEN_A, "prefixes": [], "ops": []}]}, "non-empty"),
        ({"tokens": [{"name": "x", "token": TOKEN_A, "prefix": [], "ops": ["read"]}]}, "unknown"),
        (
            {
                "tokens": [
                    {"name": "x", "token": TOKEN_A, "prefixes": [], "ops": ["read"]},
                    {"name": "y", "token": TOKEN_A, "prefixes": [], "ops": ["read"]},
                ]
            },
            "same token",
        ),
    ],
)
def test_bad_tokens_files_say_what_is_wrong(doc, problem):
    with pytest.raises(ValueError, match=problem) as err:
        Policy.from_mapping(doc)
    assert TOKEN_A not in str(err.value)  # never echo a secret


def test_secrets_stay_out_of_reprs():
    assert TOKEN_A not in repr(policy())
    assert TOKEN_A not in repr(Credentials(TOKEN_A))
    from tensorcache.client.config import ClientConfig

    assert TOKEN_A not in repr(ClientConfig(token=TOKEN_A))


def test_bearer_metadata_round_trip():
    md = Credentials(TOKEN_A).metadata()
    assert token_of(md) == TOKEN_A
    assert token_of(()) is None
    assert token_of((("authorization", "Basic xyz"),)) is None


def test_policy_file_reloads_on_change_and_keeps_the_old_on_a_bad_file(tmp_path, monkeypatch):
    import tensorcache.authgrpc as authgrpc

    monkeypatch.setattr(authgrpc, "RELOAD_EVERY_S", 0.0)  # check the file on every call
    path = tmp_path / "tokens.json"
    entry = {"name": "a", "token": TOKEN_A, "prefixes": [""], "ops": ["read"]}
    path.write_text(json.dumps({"tokens": [entry]}))
    tokens = PolicyFile(path)
    assert tokens.authenticate(TOKEN_A).name == "a"
    path.write_text("{not json")
    assert tokens.authenticate(TOKEN_A).name == "a"  # kept
    entry = {**entry, "name": "b", "token": "b" * 20}
    path.write_text(json.dumps({"tokens": [entry]}))
    assert tokens.authenticate("b" * 20).name == "b"
    with pytest.raises(Unauthenticated):
        tokens.authenticate(TOKEN_A)
    with pytest.raises(ValueError):  # a bad file at start fails loudly
        path.write_text("[]")
        PolicyFile(path)


def test_listing_hot_keys_needs_admin_counters_do_not():
    from tensorcache.node.authz import check_stat
    from tensorcache.proto import tensorcache_pb2 as pb

    a = policy().authenticate(TOKEN_A)
    check_stat(a, pb.StatRequest())  # counts only: any token
    with pytest.raises(PermissionDenied, match="admin"):
        check_stat(a, pb.StatRequest(hot_keys=10))  # key names of every namespace
    check_stat(policy().authenticate(TOKEN_ADMIN), pb.StatRequest(hot_keys=10))


def test_pinning_a_prefix_needs_write_on_all_of_it():
    from tensorcache.node.authz import check_pin
    from tensorcache.proto import tensorcache_pb2 as pb

    w = Policy.from_mapping(
        {"tokens": [{"name": "w", "token": TOKEN_A, "prefixes": ["m/"], "ops": ["write"]}]}
    ).authenticate(TOKEN_A)
    check_pin(w, pb.PinRequest(prefix="m/rev1/"))
    with pytest.raises(PermissionDenied, match="may not write"):
        check_pin(w, pb.PinRequest(prefix=""))  # every namespace, not only m/
    with pytest.raises(PermissionDenied):
        check_pin(policy().authenticate(TOKEN_A), pb.PinRequest(prefix="a/"))  # read-only
