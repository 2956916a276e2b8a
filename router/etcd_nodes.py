"""Nodes' records in etcd, each on a lease: register, heartbeat, deregister, rescue.

Nodes still talk to *a* router (Register/Heartbeat/Deregister); the router
turns each call into etcd operations and keeps nothing in between:

* register: grant a lease, put the member with it. A re-registration of the
  same name revokes the lease the key had before, so it cannot delete the
  new record when it runs out.
* heartbeat: read the key and keep its lease alive once. The lease id comes
  from the key's own metadata, so *any* router can refresh *any* node's
  lease. A missing key answers ``known=False`` and the node registers again.
* expiry is etcd's job: a node that stops heartbeating loses its lease, and
  etcd deletes its key, whether or not a router is running.

The one thing kept between calls: which nodes heartbeated while etcd could
not hear them, for ``rescue`` (below).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping

from aetcd import transactions as tx

from tensorcache.errors import Unavailable
from tensorcache.ring import RingMember
from tensorcache.router.etcd_conn import EtcdConnection, lease_seconds
from tensorcache.router.etcd_records import EtcdKeys, member_record

log = logging.getLogger("tensorcache.router")


class NodeLeases:
    def __init__(self, conn: EtcdConnection, keys: EtcdKeys, ttl_s: float) -> None:
        self._conn = conn
        self._keys = keys
        self._ttl_s = ttl_s
        self._lease_ttl = lease_seconds(ttl_s)
        # Nodes whose heartbeat etcd did not hear, and when: alive, but their
        # leases may run out while etcd is cut off (see rescue).
        self._unheard: dict[str, float] = {}
        self._lock = threading.Lock()

    def register(self, member: RingMember) -> None:
        self._conn.submit(self._register(member), f"register {member.name}")

    async def _register(self, member: RingMember) -> None:
        lease = await self._conn.client.lease(self._lease_ttl)
        put = await self._conn.client.put(
            self._keys.member(member.name), member_record(member), lease=lease.id, prev_kv=True
        )
        if put.prev_kv is not None and put.prev_kv.lease and put.prev_kv.lease != lease.id:
            await self._conn.revoke(put.prev_kv.lease)

    def heartbeat(self, name: str) -> bool:
        """Keep ``name``'s lease alive once; False when etcd has no record of it."""
        try:
            return self._conn.submit(self._heartbeat(name), f"heartbeat {name}")
        except Unavailable:
            with self._lock:
                self._unheard[name] = time.monotonic()
            raise

    async def _heartbeat(self, name: str) -> bool:
        got = await self._conn.client.get(self._keys.member(name))
        if got is None or not got.lease:
            return False
        reply = await self._conn.client.refresh_lease(got.lease)
        # TTL <= 0: the lease ran out between the read and the keepalive.
        return reply is not None and reply.TTL > 0

    def deregister(self, name: str) -> None:
        self._conn.submit(self._deregister(name), f"deregister {name}")

    async def _deregister(self, name: str) -> None:
        deleted = await self._conn.client.delete(self._keys.member(name), prev_kv=True)
        if deleted is not None and deleted.prev_kv is not None and deleted.prev_kv.lease:
            await self._conn.revoke(deleted.prev_kv.lease)

    async def rescue(self, known: Mapping[str, RingMember]) -> None:
        """Put back the records of nodes that heartbeated to us while etcd could not hear.

        ``known`` is what the watch last saw. etcd counts lease time only
        while it runs, but a *hung* or partitioned etcd keeps counting, so
        a node that kept heartbeating through us can lose its lease. Its
        record comes back anyway on its next heartbeat (known=False, it
        registers again), but a router watching meanwhile would publish a
        ring without it, then with it: a flap. Putting the record back
        *before* the watch resumes means the delete and the put are seen
        together and no view without the node is published (a view waits
        for the epoch of the last change it has seen). Only records still
        missing are put, and only of nodes heard from within ttl_s, with a
        fresh lease: a node that died meanwhile expires one ttl later, as
        it would have.
        """
        now = time.monotonic()
        with self._lock:
            for name in [n for n, t in self._unheard.items() if now - t > self._ttl_s]:
                del self._unheard[name]  # silent for a ttl: not known to be alive
            recent = sorted(self._unheard)
        for name in recent:
            member = known.get(name)
            if member is None:
                continue
            key = self._keys.member(name)
            lease = await self._conn.client.lease(self._lease_ttl)
            put_back, _ = await self._conn.client.transaction(
                compare=[tx.Version(key) == 0],
                success=[tx.Put(key, member_record(member), lease=lease.id)],
                failure=[],
            )
            if put_back:
                log.warning(
                    "node %s lost its etcd lease while etcd %s was unreachable; "
                    "its record is back (it kept heartbeating)",
                    name,
                    self._conn.url,
                )
            else:
                await self._conn.revoke(lease.id)
        with self._lock:  # done (a failure above leaves them for the next attempt)
            for name in recent:
                if self._unheard.get(name, now) <= now:
                    del self._unheard[name]
