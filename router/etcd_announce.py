"""Routers announce themselves in etcd: ``<prefix>-routers/<address>`` on a lease.

The key sits beside the watched prefix (router/etcd_records.py), so routers
coming and going are never membership changes. Each router keeps its own
key alive and puts it again (on a fresh lease) when it ran out.
"""

from __future__ import annotations

from tensorcache.router.etcd_conn import EtcdConnection, lease_seconds
from tensorcache.router.etcd_records import EtcdKeys


class EtcdAnnouncer:
    """The ``Announcer`` over etcd (router/announce.py)."""

    def __init__(self, conn: EtcdConnection, keys: EtcdKeys, ttl_s: float) -> None:
        self._conn = conn
        self._keys = keys
        self._lease_ttl = lease_seconds(ttl_s)
        # (address, lease id) of this router's announcement; read and
        # written only on the connection's loop.
        self._announced: tuple[str, int] | None = None

    def keep_announced(self, address: str) -> None:
        """Keep ``routers/<address>`` alive on a lease (put it again if it ran out)."""
        self._conn.submit(self._keep_announced(address), "announce router")

    async def _keep_announced(self, address: str) -> None:
        if self._announced is not None and self._announced[0] == address:
            reply = await self._conn.client.refresh_lease(self._announced[1])
            if reply is not None and reply.TTL > 0:
                return
        lease = await self._conn.client.lease(self._lease_ttl)
        await self._conn.client.put(self._keys.router(address), b"", lease=lease.id)
        self._announced = (address, lease.id)

    def routers(self) -> list[str]:
        """Addresses of the routers announced in etcd (this one included)."""
        return self._conn.submit(self._routers(), "list routers")

    async def _routers(self) -> list[str]:
        got = await self._conn.client.get_prefix(self._keys.routers)
        n = len(self._keys.routers)
        return [kv.key[n:].decode(errors="replace") for kv in got]
