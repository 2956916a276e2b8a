"""Router announcement: how routers find each other to relay nodes' key events.

A node publishes its key events to the one router it registered with; the
relay (router/relay.py) forwards them to every *other* router, so it needs
to know which routers serve the cluster. An ``Announcer`` keeps this router
announced and lists the announced ones. With membership in etcd that is a
key on a lease per router (router/etcd_announce.py); an embedded router is
the only one, so ``NoAnnouncer`` announces nowhere and finds nobody, and the
router needs no special case for it.
"""

from __future__ import annotations

from typing import Protocol


class Announcer(Protocol):
    def keep_announced(self, address: str) -> None:
        """Announce this router at ``address``, or keep its announcement alive.

        Called about once a second; raises ``Unavailable`` when the store
        cannot be reached (the announcement then lapses after its ttl).
        """
        ...

    def routers(self) -> list[str]:
        """Addresses of the announced routers (this one included)."""
        ...


class NoAnnouncer:
    """The one router of an embedded cluster: nothing to announce, no other router."""

    def keep_announced(self, address: str) -> None:
        pass

    def routers(self) -> list[str]:
        return []
