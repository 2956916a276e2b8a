"""Who may do what on a node: the per-method rules, for gRPC and the data channel alike.

The policy is tensorcache/auth.py (tokens -> grants); this module says which
operation each request is and which keys it touches, and checks every key
of a batch. Both doors use the same rules: gRPC through the AuthInterceptor
(tensorcache/authgrpc.py), the data channel per request on a connection
authenticated by its AUTH frame (node/dataserver.py).

What needs ``admin``: writes that carry a version or stamp (node-to-node
pushes: replicas, handoffs, drains, which set versions no client may
choose) and handoff reads (they skip the epoch check and see entries the
node no longer owns), and a Stat that lists the hottest keys
(``StatRequest.hot_keys``: key names of every namespace). Stat (counts, not
keys) and Fence (catch up with the router, bounded): any token.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tensorcache.auth import ADMIN, READ, WRITE, Grant
from tensorcache.authgrpc import AuthInterceptor, PolicyFile, Rule, any_token
from tensorcache.grpcutil import NODE_SERVICE
from tensorcache.node.validate import parse_header
from tensorcache.proto import tensorcache_pb2 as pb
from tensorcache.tickets import ISSUE


def _key(raw: bytes) -> str:
    # Not yet validated (the node does that next, with a precise message):
    # decode leniently so a bad key is still refused or let through to it.
    return raw.decode("utf-8", "replace")


def check_put(grant: Grant, req: pb.PutRequest) -> None:
    for e in req.entries:
        grant.check(ADMIN if e.version or e.stamp else WRITE, _key(e.key))


def check_get(grant: Grant, req: pb.GetRequest) -> None:
    if req.handoff:
        grant.require(ADMIN)
    for k in req.keys:
        grant.check(READ, _key(k.key))


def check_delete(grant: Grant, req: pb.DeleteRequest) -> None:
    for k in req.keys:
        grant.check(WRITE, _key(k.key))


def check_fill(grant: Grant, req: pb.FillRequest) -> None:
    grant.check(WRITE, _key(req.key))


def check_stat(grant: Grant, req: pb.StatRequest) -> None:
    if req.hot_keys:  # names the hottest keys of every namespace (`tensorcache hot`)
        grant.require(ADMIN)


def check_pin(grant: Grant, req: pb.PinRequest) -> None:
    # Pinning changes what eviction may take, for every key under the
    # prefix: write access to the whole prefix ("" needs every namespace).
    grant.check(WRITE, req.prefix)


def _raw(cls: Any, what: str, check: Callable[[Grant, Any], None]) -> Rule:
    def rule(grant: Grant, raw: bytes) -> None:
        check(grant, parse_header(cls, raw, what))

    return rule


RULES: dict[str, Rule] = {
    f"/{NODE_SERVICE}/Put": _raw(pb.PutRequest, "put", check_put),
    f"/{NODE_SERVICE}/Get": _raw(pb.GetRequest, "get", check_get),
    f"/{NODE_SERVICE}/Delete": _raw(pb.DeleteRequest, "delete", check_delete),
    f"/{NODE_SERVICE}/Fill": _raw(pb.FillRequest, "fill", check_fill),
    # A fence only makes the node catch up with its router's ring (bounded);
    # clients fence every node after an invalidation (client/fence.py).
    f"/{NODE_SERVICE}/Fence": any_token,
    f"/{NODE_SERVICE}/Stat": _raw(pb.StatRequest, "stat", check_stat),
    f"/{NODE_SERVICE}/Pin": _raw(pb.PinRequest, "pin", check_pin),
    # A data-channel ticket carries its caller's token name; the data
    # channel then checks that token's grant on every request.
    ISSUE: any_token,
}


def interceptor(tokens: PolicyFile) -> AuthInterceptor:
    return AuthInterceptor(tokens, RULES)
