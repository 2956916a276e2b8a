"""Who may call what on a router (rules for tensorcache/authgrpc.py's interceptor).

Ring snapshots and router status carry no key data: any token. Membership
(Register, Heartbeat, Deregister) and key-event publishing are what nodes
and routers do: ``admin``. An invalidation needs ``invalidate`` on a prefix
inside the grant (so a team can drop its own namespace and nobody else's;
"" is everything, so only a grant of "" may). Watch streams every key event
of the cluster, so it needs ``read`` on every key (prefix ""): a client
with a narrower grant uses the strict near cache, which asks the key's
owner (checked per key) instead.
"""

from __future__ import annotations

from tensorcache.auth import INVALIDATE, READ, Grant
from tensorcache.authgrpc import AuthInterceptor, PolicyFile, Rule, admin_only, any_token
from tensorcache.proto import tensorcache_pb2 as pb

SERVICE = "tensorcache.v1.Router"


def check_invalidate(grant: Grant, req: pb.InvalidateRequest) -> None:
    # The prefix itself must lie inside a granted one: "team-a" is refused to
    # a grant of "team-a/", since it would also drop "team-ab/...".
    grant.check(INVALIDATE, req.prefix)


def check_watch(grant: Grant, req: pb.WatchRequest) -> None:
    grant.check(READ, "")


RULES: dict[str, Rule] = {
    f"/{SERVICE}/GetRing": any_token,
    f"/{SERVICE}/Status": any_token,
    f"/{SERVICE}/Register": admin_only,
    f"/{SERVICE}/Heartbeat": admin_only,
    f"/{SERVICE}/Deregister": admin_only,
    f"/{SERVICE}/Publish": admin_only,
    f"/{SERVICE}/Invalidate": check_invalidate,
    f"/{SERVICE}/Watch": check_watch,
}


def interceptor(tokens: PolicyFile) -> AuthInterceptor:
    return AuthInterceptor(tokens, RULES)
