"""Tokens and what they may do: the pure access policy (no I/O but reading its file).

A node or router started with ``--auth-tokens FILE`` refuses every call that
carries no known token (``Unauthenticated``) and every key or operation
outside the token's grant (``PermissionDenied``, naming the key and the
prefixes granted). The file is JSON, so nothing beyond the standard library
parses it::

    {"tokens": [
      {"name": "team-a", "sha256": "<hex of sha256(token)>",
       "prefixes": ["team-a/"], "ops": ["read", "write", "invalidate"]},
      {"name": "cluster", "token": "<the token itself>", "prefixes": [""], "ops": ["admin"]}
    ]}

``sha256`` is preferred: the file then holds no secret (a token is 32+
random bytes, so its hash cannot be searched); ``token`` is accepted for
tests and small setups. ``name`` is what errors and logs show: a token itself
is never printed, stored in a repr, or logged.

Operations: ``read`` (Get), ``write`` (Put, Delete, Fill: a fill lease is the
right to write the key), ``invalidate`` (Router.Invalidate of a prefix inside
the grant), ``admin`` (everything, on every key: nodes and routers use it
for membership, pushes between nodes, fences and handoffs). A prefix ``""``
covers every key. Key names are checked as UTF-8 strings; a stripe's key
starts with its tensor's key, so it falls under the same prefix.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from tensorcache.errors import PermissionDenied, Unauthenticated

READ = "read"
WRITE = "write"
INVALIDATE = "invalidate"
ADMIN = "admin"
OPS = (READ, WRITE, INVALIDATE, ADMIN)
TOKEN_ENV = "TENSORCACHE_TOKEN"
MIN_TOKEN_CHARS = 16


def token_digest(token: str | bytes) -> str:
    raw = token.encode("utf-8") if isinstance(token, str) else token
    return hashlib.sha256(raw).hexdigest()


@dataclass(frozen=True)
class Grant:
    """What one token may do: operations on keys under any of ``prefixes``."""

    name: str
    prefixes: tuple[str, ...]
    ops: frozenset[str]

    def allows(self, op: str, key: str) -> bool:
        if ADMIN in self.ops:
            return True
        return op in self.ops and any(key.startswith(p) for p in self.prefixes)

    def check(self, op: str, key: str) -> None:
        """Raise PermissionDenied unless ``op`` on ``key`` (or prefix) is granted."""
        if self.allows(op, key):
            return
        shown = key if len(key) <= 200 else key[:200] + "..."
        if op not in self.ops and ADMIN not in self.ops:
            raise PermissionDenied(
                f"token {self.name!r} may not {op} (it may: {', '.join(sorted(self.ops))})"
            )
        raise PermissionDenied(
            f"token {self.name!r} may not {op} {shown!r}: it is granted only the prefixes "
            f"{list(self.prefixes)}"
        )

    def require(self, op: str) -> None:
        """Raise PermissionDenied unless ``op`` is granted at all (keyless calls)."""
        if op not in self.ops and ADMIN not in self.ops:
            raise PermissionDenied(
                f"token {self.name!r} may not {op} (it may: {', '.join(sorted(self.ops))})"
            )


@dataclass(frozen=True)
class Policy:
    """Grants by token digest. ``authenticate`` is a dict look-up of a sha256."""

    grants: Mapping[str, Grant] = field(repr=False)

    def authenticate(self, token: str | bytes | None) -> Grant:
        if not token:
            raise Unauthenticated("no token: this cluster requires one (connect(..., token=))")
        grant = self.grants.get(token_digest(token))
        if grant is None:
            raise Unauthenticated("the token is not known to this cluster")
        return grant

    @staticmethod
    def from_mapping(doc: object, *, where: str = "auth tokens") -> Policy:
        """Build from the parsed JSON document; ValueError names what is wrong."""
        if not isinstance(doc, dict) or not isinstance(doc.get("tokens"), list):
            raise ValueError(f"{where}: expected an object with a list 'tokens'")
        grants: dict[str, Grant] = {}
        names: set[str] = set()
        for i, item in enumerate(doc["tokens"]):
            at = f"{where}: tokens[{i}]"
            if not isinstance(item, dict):
                raise ValueError(f"{at} is not an object")
            unknown = set(item) - {"name", "token", "sha256", "prefixes", "ops"}
            if unknown:
                raise ValueError(f"{at} has unknown fields {sorted(unknown)}")
            name = item.get("name")
            if not isinstance(name, str) or not name:
                raise ValueError(f"{at}.name must be a non-empty string")
            if name in names:
                raise ValueError(f"{at}.name {name!r} is used twice")
            names.add(name)
            digest = _digest_of(item, at)
            if digest in grants:
                raise ValueError(f"{at} ({name!r}) has the same token as {grants[digest].name!r}")
            grants[digest] = Grant(name, _prefixes(item.get("prefixes"), at), _ops(item, at))
        return Policy(grants)

    @staticmethod
    def from_file(path: str | os.PathLike[str]) -> Policy:
        with open(path, encoding="utf-8") as f:
            try:
                doc = json.load(f)
            except json.JSONDecodeError as exc:
                raise ValueError(f"auth tokens file {path}: not JSON: {exc}") from exc
        return Policy.from_mapping(doc, where=f"auth tokens file {path}")


def _digest_of(item: Mapping[str, object], at: str) -> str:
    token, digest = item.get("token"), item.get("sha256")
    if (token is None) == (digest is None):
        raise ValueError(f"{at} needs exactly one of 'token' and 'sha256'")
    if token is not None:
        if not isinstance(token, str) or len(token) < MIN_TOKEN_CHARS:
            raise ValueError(f"{at}.token must be a string of >= {MIN_TOKEN_CHARS} characters")
        return token_digest(token)
    if not isinstance(digest, str) or len(digest) != 64:
        raise ValueError(f"{at}.sha256 must be 64 hex digits")
    try:
        bytes.fromhex(digest)
    except ValueError as exc:
        raise ValueError(f"{at}.sha256 must be 64 hex digits") from exc
    return digest.lower()


def _prefixes(value: object, at: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise ValueError(f"{at}.prefixes must be a list of strings ('' covers every key)")
    return tuple(value)


def _ops(item: Mapping[str, object], at: str) -> frozenset[str]:
    ops = item.get("ops")
    if not isinstance(ops, list) or not ops:
        raise ValueError(f"{at}.ops must be a non-empty list of {list(OPS)}")
    bad = [o for o in ops if o not in OPS]
    if bad:
        raise ValueError(f"{at}.ops has unknown operations {bad} (known: {list(OPS)})")
    return frozenset(str(o) for o in ops)


def check_keys(grant: Grant, op: str, keys: Iterable[str]) -> None:
    """Check every key of a batch (get_many / put_many check each key)."""
    for key in keys:
        grant.check(op, key)
