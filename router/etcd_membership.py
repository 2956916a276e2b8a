"""Membership kept in etcd, so routers hold no state of their own.

Any number of routers can serve the same cluster at once, and a restarted
router loses nothing: every fact lives in etcd under a prefix (default
``/tensorcache/``)::

    members/<name>   serialized pb.Member, attached to an etcd lease of ttl_s
    ring-epoch       the cluster's epoch, 20-digit zero-padded decimal

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

Epochs. Every router watches the prefix and builds its view from the watch
alone (``view()`` never does I/O). When a members/ key changes *effectively*
(a member added, removed or changed; a re-put of an identical record is not
a change) at revision R, the router runs the transaction "if ring-epoch < R
or absent, put ring-epoch = R". On (re)synchronising it does the same with
the revision S of its initial range, which also covers leases that expired
while no router was watching. A view is published only when the ring-epoch
the router has seen is >= the revision of the last effective member change
it has seen.

Why routers agree: ring-epoch only ever holds a revision E, and is written
at a revision greater than E. Watches deliver events in revision order, so
a router that sees ring-epoch = E has already applied every member event at
revisions <= E; publishing only when no effective member change is newer
than E means its member set is exactly etcd's member set at revision E. So
an epoch names one membership, the same on every router. Whether a change
is effective is decided from the same history on every router, so they all
wait for the same epochs.

Why epochs only increase: etcd revisions only increase, and the transaction
only ever raises ring-epoch (compare-and-set on the value; zero padding
makes the byte comparison etcd does a numeric one). Several routers racing
to bump to the same R write it once; the others' compares fail.

Threads. aetcd is asyncio; one event loop runs in a daemon thread owned by
this object. gRPC handler threads submit coroutines to it with a timeout;
a timeout or connection failure becomes ``Unavailable("etcd URL
unreachable: ...")``. The watch loop resynchronises with backoff after any
failure, logs it and counts it in ``watch_failures``; while etcd is down,
``view()`` keeps returning the last published view.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import math
import threading
from collections.abc import Awaitable
from typing import TypeVar
from urllib.parse import urlsplit

import aetcd
import aetcd.exceptions
from aetcd import transactions as tx
from google.protobuf.message import DecodeError

from tensorcache.errors import Unavailable
from tensorcache.proto import tensorcache_pb2 as pb
from tensorcache.router import members
from tensorcache.router.membership import MembershipView
from tensorcache.router.ring import RingMember

log = logging.getLogger("tensorcache.router")

T = TypeVar("T")

DEFAULT_PREFIX = "/tensorcache/"
_EPOCH_WIDTH = 20  # digits of a uint64: byte order == numeric order
_MAX_BACKOFF_S = 5.0


def parse_endpoint(url: str) -> tuple[str, int]:
    """``http://host:port`` (or ``host:port``) -> (host, port)."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme != "http":
        raise ValueError(f"etcd URL {url!r}: only http:// is supported")
    if not parts.hostname or parts.port is None:
        raise ValueError(f"etcd URL {url!r} must be http://host:port")
    return parts.hostname, parts.port


def _epoch_value(epoch: int) -> bytes:
    return str(epoch).zfill(_EPOCH_WIDTH).encode()


class EtcdMembership:
    """The ``Membership`` protocol over etcd keys, leases and a watch."""

    def __init__(
        self,
        url: str,
        ttl_s: float = 3.0,
        *,
        prefix: str = DEFAULT_PREFIX,
        timeout_s: float = 5.0,
        startup_timeout_s: float = 10.0,
    ) -> None:
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if not prefix.endswith("/"):
            raise ValueError(f"prefix {prefix!r} must end with '/'")
        host, port = parse_endpoint(url)
        self.url = url
        self.ttl_s = ttl_s
        # etcd leases are whole seconds (and etcd raises tiny ones to its minimum).
        self._lease_ttl = max(1, math.ceil(ttl_s))
        self.timeout_s = timeout_s
        self._members_prefix = f"{prefix}members/".encode()
        self._epoch_key = f"{prefix}ring-epoch".encode()
        self._watch_prefix = prefix.encode()
        #: Times the watch loop failed and resynchronised (each one is logged).
        self.watch_failures = 0
        self._view = MembershipView(0, ())
        self._synced = threading.Event()
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="etcd-membership", daemon=True
        )
        self._thread.start()
        self._client: aetcd.Client = self._submit(
            self._make_client(host, port), "connect", timeout_s
        )
        self._watch_task = self._submit(self._start_watch(), "start watch", timeout_s)
        if not self._synced.wait(startup_timeout_s):
            self.close()
            raise Unavailable(
                f"etcd {url} unreachable: no membership view within {startup_timeout_s:.0f}s"
            )

    # ------------------------------------------------------------------ plumbing
    async def _make_client(self, host: str, port: int) -> aetcd.Client:
        return aetcd.Client(host=host, port=port, timeout=self.timeout_s)

    async def _start_watch(self) -> asyncio.Task[None]:
        return asyncio.get_running_loop().create_task(self._watch_loop())

    def _submit(self, coro: Awaitable[T], what: str, timeout: float | None = None) -> T:
        """Run ``coro`` on the loop thread; the one place etcd errors are mapped."""
        timeout = self.timeout_s if timeout is None else timeout
        future = asyncio.run_coroutine_threadsafe(
            asyncio.wait_for(coro, timeout),  # type: ignore[arg-type]
            self._loop,
        )
        try:
            return future.result(timeout + 1.0)
        except (TimeoutError, concurrent.futures.TimeoutError) as exc:
            future.cancel()
            raise Unavailable(f"etcd {self.url} unreachable: {what} timed out") from exc
        except (
            aetcd.exceptions.ConnectionFailedError,
            aetcd.exceptions.ConnectionTimeoutError,
        ) as exc:
            raise Unavailable(f"etcd {self.url} unreachable: {what}: {exc}") from exc
        except aetcd.exceptions.ClientError as exc:
            raise Unavailable(f"etcd {self.url} failed {what}: {exc!r}") from exc

    def _key(self, name: str) -> bytes:
        return self._members_prefix + name.encode()

    async def _revoke(self, lease_id: int) -> None:
        """Revoke a lease that may already have expired (then there is nothing to do)."""
        try:
            await self._client.revoke_lease(lease_id)
        except aetcd.exceptions.ClientError as exc:
            if "not found" not in str(exc):
                raise

    # ------------------------------------------------------------------ Membership
    def register(self, member: RingMember) -> int:
        self._submit(self._register(member), f"register {member.name}")
        return self.view().epoch

    async def _register(self, member: RingMember) -> None:
        lease = await self._client.lease(self._lease_ttl)
        put = await self._client.put(
            self._key(member.name),
            members.to_pb(member).SerializeToString(),
            lease=lease.id,
            prev_kv=True,
        )
        if put.prev_kv is not None and put.prev_kv.lease and put.prev_kv.lease != lease.id:
            await self._revoke(put.prev_kv.lease)

    def heartbeat(self, name: str) -> tuple[int, bool]:
        known = self._submit(self._heartbeat(name), f"heartbeat {name}")
        return self.view().epoch, known

    async def _heartbeat(self, name: str) -> bool:
        got = await self._client.get(self._key(name))
        if got is None or not got.lease:
            return False
        reply = await self._client.refresh_lease(got.lease)
        # TTL <= 0: the lease ran out between the read and the keepalive.
        return reply is not None and reply.TTL > 0

    def deregister(self, name: str) -> int:
        self._submit(self._deregister(name), f"deregister {name}")
        return self.view().epoch

    async def _deregister(self, name: str) -> None:
        deleted = await self._client.delete(self._key(name), prev_kv=True)
        if deleted is not None and deleted.prev_kv is not None and deleted.prev_kv.lease:
            await self._revoke(deleted.prev_kv.lease)

    def view(self) -> MembershipView:
        return self._view

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True

        async def shutdown() -> None:
            task = getattr(self, "_watch_task", None)
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            client = getattr(self, "_client", None)
            if client is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(client.close(), self.timeout_s)
            # grpc.aio leaves per-call tasks behind; finish them before the loop closes.
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            if others:
                await asyncio.wait(others, timeout=1.0)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(self.timeout_s + 1)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()

    # ------------------------------------------------------------------ the watch
    async def _watch_loop(self) -> None:
        """Resynchronise and watch, forever; every failure is logged and counted."""
        backoff = 0.1
        while True:
            try:
                state, watch = await self._sync()
                backoff = 0.1
                await self._watch(watch, state)
                raise ConnectionError("watch stream ended")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.watch_failures += 1
                log.warning(
                    "etcd %s watch failed (%s: %s); resyncing in %.1fs (failure %d)",
                    self.url,
                    type(exc).__name__,
                    exc,
                    backoff,
                    self.watch_failures,
                )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _MAX_BACKOFF_S)

    async def _sync(self) -> tuple[_WatchState, aetcd.rtypes.Watch]:
        """Read the prefix at revision S, raise ring-epoch to S, watch from S + 1."""
        state = _WatchState()
        snapshot = await asyncio.wait_for(
            self._client.get_prefix(self._watch_prefix), self.timeout_s
        )
        start = snapshot.header.revision
        for kv in snapshot:
            state.apply_put(self, kv)
        state.member_rev = start  # covers whatever changed while nobody watched
        self._publish(state)
        await asyncio.wait_for(self._bump(start), self.timeout_s)
        watch = await asyncio.wait_for(
            self._client.watch_prefix(self._watch_prefix, start_revision=start + 1),
            self.timeout_s,
        )
        return state, watch

    async def _watch(self, watch: aetcd.rtypes.Watch, state: _WatchState) -> None:
        """Apply events until the stream fails or the probe finds etcd gone."""
        loop = asyncio.get_running_loop()
        tasks = {loop.create_task(self._consume(watch, state)), loop.create_task(self._probe())}
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # re-raise the failure that ended the watch
        finally:
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            with contextlib.suppress(Exception):
                await asyncio.wait_for(watch.cancel(), self.timeout_s)

    async def _consume(self, watch: aetcd.rtypes.Watch, state: _WatchState) -> None:
        async for event in watch:
            rev = event.kv.mod_revision
            if event.kind == "PUT":
                changed = state.apply_put(self, event.kv)
            else:
                changed = state.apply_delete(self, event.kv)
            if changed:
                state.member_rev = max(state.member_rev, rev)
                await asyncio.wait_for(self._bump(rev), self.timeout_s)
            self._publish(state)

    async def _probe(self) -> None:
        """Fail the watch when etcd stops answering (a hung stream raises nothing)."""
        interval = max(0.5, min(self.ttl_s / 2, 2.0))
        while True:
            await asyncio.sleep(interval)
            await asyncio.wait_for(self._client.get(self._epoch_key), self.timeout_s)

    async def _bump(self, revision: int) -> None:
        """Raise ring-epoch to ``revision`` unless it is already there (or past it)."""
        value = _epoch_value(revision)
        raise_it = tx.Txn(
            compare=[tx.Value(self._epoch_key) < value],
            success=[tx.Put(self._epoch_key, value)],
            failure=[],
        )
        await self._client.transaction(
            compare=[tx.Version(self._epoch_key) > 0],
            success=[raise_it],
            failure=[tx.Put(self._epoch_key, value)],
        )

    def _publish(self, state: _WatchState) -> None:
        if state.epoch is None or state.epoch < state.member_rev:
            return  # the epoch for this member set is not written yet
        if self._view.epoch == state.epoch and self._view.members == state.ring():
            return
        new = MembershipView(state.epoch, state.ring())
        old_names = {m.name for m in self._view.members}
        new_names = {m.name for m in new.members}
        log.info(
            "ring epoch %d: %d members (joined %s, left %s)",
            new.epoch,
            len(new.members),
            sorted(new_names - old_names),
            sorted(old_names - new_names),
        )
        self._view = new
        self._synced.set()


class _WatchState:
    """What one watch session has seen: member records and ring-epoch."""

    def __init__(self) -> None:
        self.members: dict[str, RingMember] = {}
        self.epoch: int | None = None
        self.member_rev = 0

    def ring(self) -> tuple[RingMember, ...]:
        return tuple(self.members[name] for name in sorted(self.members))

    def apply_put(self, owner: EtcdMembership, kv: aetcd.rtypes.KeyValue) -> bool:
        """Apply one key's new value; True when the member set changed."""
        if kv.key == owner._epoch_key:
            try:
                self.epoch = int(kv.value)
            except ValueError:
                log.error("etcd key %r holds %r, not an epoch; ignored", kv.key, kv.value)
            return False
        if not kv.key.startswith(owner._members_prefix):
            return False
        try:
            member = members.from_pb(pb.Member.FromString(kv.value))
        except DecodeError:
            log.error("etcd key %r does not hold a pb.Member; ignored", kv.key)
            return False
        name = kv.key[len(owner._members_prefix) :].decode(errors="replace")
        if self.members.get(name) == member:
            return False
        self.members[name] = member
        return True

    def apply_delete(self, owner: EtcdMembership, kv: aetcd.rtypes.KeyValue) -> bool:
        if not kv.key.startswith(owner._members_prefix):
            return False
        name = kv.key[len(owner._members_prefix) :].decode(errors="replace")
        return self.members.pop(name, None) is not None
