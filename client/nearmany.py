"""Near-cache hits for many keys at once: one version check per node, not per key.

A strict near-cache (client/nearcache.py) serves a copy only once the owner
node confirms it is still the current version. For ``get_many`` that check
is one batched head-only request per node (``Client.versions``, over the
data channel), so revalidating a hundred hot keys costs about what one
``version()`` does rather than a hundred of them. In watch mode, while the
event stream is live, there is no check at all (an event would have dropped
a stale copy).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from tensorcache.client.nearcache import Near, NearCache

Versions = Callable[[list[str]], Mapping[str, int | None]]


def current(
    near: NearCache,
    keys: list[str],
    *,
    live: bool,
    versions: Versions,
    count: Callable[..., None],
) -> dict[str, Near]:
    """The near-cache copies of ``keys`` that are current (stale ones are dropped).

    ``live``: the event stream vouches for every copy (watch mode); else
    ``versions(keys)`` asks the owners, all keys in one call.
    """
    found: dict[str, Near] = {}
    for key in keys:
        hit = near.lookup(key)
        if hit is not None:
            found[key] = hit
    if len(found) < len(keys):
        count("near_misses", len(keys) - len(found))
    if found and not live:
        now = versions(list(found))
        stale = [k for k, hit in found.items() if now.get(k) != hit.version]
        for key in stale:
            near.drop(key)
            del found[key]
        if stale:
            count("near_stale", len(stale))
    if found:
        count("near_hits", len(found))
    return found
