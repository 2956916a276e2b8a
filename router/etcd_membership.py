"""Membership kept in etcd, so routers hold no state of their own.

Any number of routers can serve the same cluster at once, and a restarted
router loses nothing: every fact lives in etcd under a prefix (default
``/tensorcache/``; the key layout is in router/etcd_records.py): member
records on leases, namespace invalidation records, and ``ring-epoch``.

Nodes still talk to *a* router (Register/Heartbeat/Deregister); the router
turns each call into etcd operations and keeps nothing in between
(router/etcd_nodes.py: leases, and expiry left to etcd).
``invalidate(prefix)`` puts the prefix's key; its mod_revision R is the
record's epoch. The call returns R once this router's *published* view is
at an epoch >= R (so it holds the record); a second invalidation of the
same prefix re-puts the key and replaces the record with a newer epoch.

Epochs. Every router watches the prefix and builds its view from the watch
alone (``view()`` never does I/O; router/etcd_watch.py). A change is
*effective* when it changes the view (router/etcd_state.py). For an
effective change at revision R the router runs the transaction "if
ring-epoch < R or absent, put ring-epoch = R". On a full
(re)synchronisation it does the same with the revision S of its initial
range, which also covers leases that expired while no router was watching.
A view is published only when the ring-epoch the router has seen is >= the
revision of the last effective change it has seen.

Why routers agree: ring-epoch only ever holds a revision E, and is written
at a revision greater than E. Watches deliver events in revision order, so
a router that sees ring-epoch = E has already applied every member and
invalidation event at revisions <= E; publishing only when no effective
change is newer than E means its member set and invalidation table are
exactly etcd's at revision E. So an epoch names one membership and one
table, the same on every router. Whether a change is effective is decided
from the same history on every router, so they all wait for the same
epochs. An invalidation record written at R is therefore in every view of
epoch >= R and in none below: a node at epoch >= R hides what it stamped
before R, and anything it commits from then on carries a stamp >= R.

Why epochs only increase: etcd revisions only increase, and the transaction
only ever raises ring-epoch (compare-and-set on the value; zero padding
makes the byte comparison etcd does a numeric one). Several routers racing
to bump to the same R write it once; the others' compares fail.

Outages (etcd stopped, restarted, hung, unreachable) and how the watch
resumes without moving the ring: router/etcd_watch.py. Threads and the one
place etcd errors become ``Unavailable``: router/etcd_conn.py. What
``status()`` reports: router/etcd_health.py.

The parts, each behind its own small interface::

    EtcdConnection   etcd_conn.py      event loop thread, client, submit, reconnect
    EtcdHealth       etcd_health.py    watch and call failures -> MembershipStatus
    NodeLeases       etcd_nodes.py     register, heartbeat, deregister, rescue
    EtcdWatch        etcd_watch.py     sync, resume, bump ring-epoch, publish views
    WatchState       etcd_state.py     pure: what the watch has seen, when to publish
    EtcdAnnouncer    etcd_announce.py  this router's announcement (the Announcer)
"""

from __future__ import annotations

import logging

from tensorcache.errors import Unavailable
from tensorcache.ring import RingMember
from tensorcache.router.etcd_announce import EtcdAnnouncer
from tensorcache.router.etcd_auth import EtcdAuth
from tensorcache.router.etcd_conn import EtcdConnection, parse_endpoint
from tensorcache.router.etcd_health import EtcdHealth
from tensorcache.router.etcd_nodes import NodeLeases
from tensorcache.router.etcd_records import DEFAULT_PREFIX, EtcdKeys, decode_prefix, encode_prefix
from tensorcache.router.etcd_watch import EtcdWatch
from tensorcache.router.membership import MembershipStatus, MembershipView, ViewCell

__all__ = ["DEFAULT_PREFIX", "EtcdMembership", "decode_prefix", "encode_prefix", "parse_endpoint"]

log = logging.getLogger("tensorcache.router")


class EtcdMembership:
    """The ``Membership`` protocol over etcd keys, leases and a watch.

    ``announcer`` is this router's ``Announcer`` over the same connection;
    ``close()`` ends both.
    """

    def __init__(
        self,
        url: str,
        ttl_s: float = 3.0,
        *,
        prefix: str = DEFAULT_PREFIX,
        timeout_s: float = 5.0,
        startup_timeout_s: float = 10.0,
        auth: EtcdAuth | None = None,
    ) -> None:
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        keys = EtcdKeys.under(prefix)
        self.url = url
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self._health = EtcdHealth(url)
        self._cell = ViewCell(MembershipView(0, ()))
        self._conn = EtcdConnection(url, timeout_s=timeout_s, health=self._health, auth=auth)
        self._keys = keys
        self._nodes = NodeLeases(self._conn, keys, ttl_s)
        self.announcer = EtcdAnnouncer(self._conn, keys, ttl_s)
        watch = EtcdWatch(
            self._conn, keys, self._health, self._cell, ttl_s=ttl_s, rescue=self._nodes.rescue
        )
        self._conn.spawn(watch.run(), "start watch")
        if not watch.wait_synced(startup_timeout_s):
            self.close()
            raise Unavailable(
                f"etcd {url} unreachable: no membership view within {startup_timeout_s:.0f}s"
            )

    @property
    def watch_failures(self) -> int:
        """Times the watch loop failed and reconnected (each one is logged)."""
        return self._health.watch_failures

    def register(self, member: RingMember) -> int:
        self._nodes.register(member)
        return self.view().epoch

    def heartbeat(self, name: str) -> tuple[int, bool]:
        known = self._nodes.heartbeat(name)
        return self.view().epoch, known

    def deregister(self, name: str) -> int:
        self._nodes.deregister(name)
        return self.view().epoch

    def invalidate(self, prefix: str) -> int:
        what = f"invalidate {prefix!r}"
        revision = self._conn.submit(self._invalidate(prefix), what)
        view = self._cell.wait(revision - 1, self.timeout_s)
        if view.epoch < revision:
            raise self._health.call_failed(
                f"etcd {self.url}: {what} was written at revision {revision}, but this "
                f"router's view is still at epoch {view.epoch} after {self.timeout_s:.0f}s"
            )
        log.info("invalidated prefix %r at epoch %d", prefix, revision)
        return revision

    async def _invalidate(self, prefix: str) -> int:
        put = await self._conn.client.put(self._keys.invalidation(prefix), prefix.encode())
        return int(put.header.revision)

    def view(self) -> MembershipView:
        return self._cell.get()

    def wait_view(self, newer_than: int, timeout: float) -> MembershipView:
        return self._cell.wait(newer_than, timeout)

    def status(self) -> MembershipStatus:
        return self._health.status()

    def close(self) -> None:
        self._conn.close()
