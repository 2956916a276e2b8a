"""Membership kept in etcd, so routers hold no state of their own.

Any number of routers can serve the same cluster at once, and a restarted
router loses nothing: every fact lives in etcd under a prefix (default
``/tensorcache/``)::

    members/<name>           serialized pb.Member, attached to an etcd lease of ttl_s
    invalidations/<b64>      a namespace invalidation; <b64> is the prefix, urlsafe
                             base64 of its UTF-8; the record's epoch is the key's
                             mod_revision (the value is the prefix, for people)
    ring-epoch               the cluster's epoch, 20-digit zero-padded decimal

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
* invalidate(prefix): put the prefix's key; its mod_revision R is the
  record's epoch. The call returns R once this router's *published* view is
  at an epoch >= R (so it holds the record); a second invalidation of the
  same prefix re-puts the key and replaces the record with a newer epoch.

Epochs. Every router watches the prefix and builds its view from the watch
alone (``view()`` never does I/O). A change is *effective* when it changes
the view: a member added, removed or changed (a re-put of an identical
record is not a change), or an invalidation record written or deleted
(every write is a new epoch, so it always is). For an effective change at
revision R the router runs the transaction "if ring-epoch < R or absent,
put ring-epoch = R". On a full (re)synchronisation it does the same with
the revision S of its initial range, which also covers leases that expired
while no router was watching. A view is published only when the ring-epoch
the router has seen is >= the revision of the last effective change it has
seen.

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

Outages. After a watch failure (etcd stopped, restarted, hung, unreachable)
the router reconnects and *resumes* the watch at the last revision it
applied (replaying an applied event changes nothing), so it sees exactly
what it missed, with no range read and no bump: an etcd restart that
changed nothing leaves the epoch where it was, and the ring does not move.
Only when that history is gone (compacted, or an etcd whose revision is
behind ours: a different data directory) does it resynchronise in full. A
stopped etcd counts no lease time, and gives every lease a fresh ttl when
it starts again, so nodes that resume heartbeating within ttl_s keep their
keys. A hung or partitioned etcd does count, and may expire the leases of
nodes that kept heartbeating to a router that could not reach it; before
resuming its watch, that router puts back the records of those nodes
(``_rescue``), so the expiry and the return land together and no ring
without them is published.

Threads. aetcd is asyncio; one event loop runs in a daemon thread owned by
this object. gRPC handler threads submit coroutines to it with a timeout;
a timeout or connection failure becomes ``Unavailable("etcd URL
unreachable: ...")``. The watch loop reconnects with backoff after any
failure, logs it and counts it in ``watch_failures``; while etcd is down,
``view()`` keeps returning the last published view and ``status()`` says
degraded, until the watch is back.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import contextlib
import logging
import math
import threading
import time
from collections.abc import Awaitable
from typing import TypeVar
from urllib.parse import urlsplit

import aetcd
import aetcd.exceptions
import grpc
from aetcd import transactions as tx
from google.protobuf.message import DecodeError

from tensorcache import members
from tensorcache.errors import Unavailable
from tensorcache.proto import tensorcache_pb2 as pb
from tensorcache.ring import RingMember
from tensorcache.router.membership import MembershipStatus, MembershipView, ViewCell

log = logging.getLogger("tensorcache.router")

T = TypeVar("T")

DEFAULT_PREFIX = "/tensorcache/"
_EPOCH_WIDTH = 20  # digits of a uint64: byte order == numeric order
_MAX_BACKOFF_S = 2.0
# Reconnect to a restarted etcd quickly (gRPC's default backs off to 120 s,
# far longer than a lease).
_CHANNEL_OPTIONS = {
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 1000,
}


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


def encode_prefix(prefix: str) -> bytes:
    """An invalidated prefix as an etcd key segment (any text, "" included)."""
    return base64.urlsafe_b64encode(prefix.encode())


def decode_prefix(segment: bytes) -> str:
    return base64.urlsafe_b64decode(segment).decode()


class _ResyncNeeded(Exception):
    """The watch cannot resume where it stopped; read everything again."""


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
        self._host, self._port = parse_endpoint(url)
        self.url = url
        self.ttl_s = ttl_s
        # etcd leases are whole seconds (and etcd raises tiny ones to its minimum).
        self._lease_ttl = max(1, math.ceil(ttl_s))
        self.timeout_s = timeout_s
        self._members_prefix = f"{prefix}members/".encode()
        self._inv_prefix = f"{prefix}invalidations/".encode()
        self._epoch_key = f"{prefix}ring-epoch".encode()
        # Routers announce themselves beside (not under) the watched prefix,
        # so their comings and goings are never membership changes.
        self._routers_prefix = f"{prefix.rstrip('/')}-routers/".encode()
        self._announced: tuple[str, int] | None = None  # (address, lease id)
        self._watch_prefix = prefix.encode()
        #: Times the watch loop failed and reconnected (each one is logged).
        self.watch_failures = 0
        # Health: why the watch is down (None: up), and the outcome of the
        # last etcd call made for a node or an invalidation (None: it worked).
        self._watch_error: str | None = "not synchronised yet"
        self._call_error: str | None = None
        self._cell = ViewCell(MembershipView(0, ()))
        # Nodes whose heartbeat etcd did not hear, and when: alive, but their
        # leases may run out while etcd is cut off (see _rescue).
        self._unheard: dict[str, float] = {}
        self._lock = threading.Lock()
        self._synced = threading.Event()
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="etcd-membership", daemon=True
        )
        self._thread.start()
        self._client: aetcd.Client = self._submit(self._make_client(), "connect", timeout_s)
        self._watch_task = self._submit(self._start_watch(), "start watch", timeout_s)
        if not self._synced.wait(startup_timeout_s):
            self.close()
            raise Unavailable(
                f"etcd {url} unreachable: no membership view within {startup_timeout_s:.0f}s"
            )

    # ------------------------------------------------------------------ plumbing
    async def _make_client(self) -> aetcd.Client:
        return aetcd.Client(
            host=self._host, port=self._port, timeout=self.timeout_s, options=_CHANNEL_OPTIONS
        )

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
            result = future.result(timeout + 1.0)
        except (TimeoutError, concurrent.futures.TimeoutError) as exc:
            future.cancel()
            raise self._failed(f"etcd {self.url} unreachable: {what} timed out") from exc
        except (
            aetcd.exceptions.ConnectionFailedError,
            aetcd.exceptions.ConnectionTimeoutError,
        ) as exc:
            raise self._failed(f"etcd {self.url} unreachable: {what}: {exc}") from exc
        except aetcd.exceptions.ClientError as exc:
            raise self._failed(f"etcd {self.url} failed {what}: {exc!r}") from exc
        except (concurrent.futures.CancelledError, asyncio.CancelledError, grpc.RpcError) as exc:
            # The watch loop replaced a broken client under this call (its
            # channel's close cancels what is in flight), or gRPC answered a
            # code aetcd does not map.
            raise self._failed(f"etcd {self.url} unreachable: {what}: {exc!r}") from exc
        self._call_error = None
        return result

    def _failed(self, message: str) -> Unavailable:
        self._call_error = message
        return Unavailable(message)

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
        try:
            known = self._submit(self._heartbeat(name), f"heartbeat {name}")
        except Unavailable:
            with self._lock:
                self._unheard[name] = time.monotonic()
            raise
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

    def invalidate(self, prefix: str) -> int:
        what = f"invalidate {prefix!r}"
        revision = self._submit(self._invalidate(prefix), what)
        view = self._cell.wait(revision - 1, self.timeout_s)
        if view.epoch < revision:
            raise self._failed(
                f"etcd {self.url}: {what} was written at revision {revision}, but this "
                f"router's view is still at epoch {view.epoch} after {self.timeout_s:.0f}s"
            )
        log.info("invalidated prefix %r at epoch %d", prefix, revision)
        return revision

    async def _invalidate(self, prefix: str) -> int:
        put = await self._client.put(self._inv_prefix + encode_prefix(prefix), prefix.encode())
        return int(put.header.revision)

    # ------------------------------------------------------------------ routers
    def keep_announced(self, address: str) -> None:
        """Keep ``routers/<address>`` alive on a lease (put it again if it ran out)."""
        self._submit(self._keep_announced(address), "announce router")

    async def _keep_announced(self, address: str) -> None:
        if self._announced is not None and self._announced[0] == address:
            reply = await self._client.refresh_lease(self._announced[1])
            if reply is not None and reply.TTL > 0:
                return
        lease = await self._client.lease(self._lease_ttl)
        await self._client.put(self._routers_prefix + address.encode(), b"", lease=lease.id)
        self._announced = (address, lease.id)

    def routers(self) -> list[str]:
        """Addresses of the routers announced in etcd (this one included)."""
        return self._submit(self._routers(), "list routers")

    async def _routers(self) -> list[str]:
        got = await self._client.get_prefix(self._routers_prefix)
        n = len(self._routers_prefix)
        return [kv.key[n:].decode(errors="replace") for kv in got]

    def view(self) -> MembershipView:
        return self._cell.get()

    def wait_view(self, newer_than: int, timeout: float) -> MembershipView:
        return self._cell.wait(newer_than, timeout)

    def status(self) -> MembershipStatus:
        problem = self._watch_error or self._call_error
        if problem is None:
            return MembershipStatus("ok", "", self.url)
        return MembershipStatus("degraded", problem, self.url)

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
        """Synchronise, then watch and resume, forever; every failure is logged and counted."""
        backoff = 0.1
        state: _WatchState | None = None
        while True:
            try:
                if state is None:
                    state, watch = await self._sync()
                else:
                    watch = await self._resume(state)
                self._watch_error = None
                self._call_error = None
                backoff = 0.1
                await self._watch(watch, state)
                raise ConnectionError("watch stream ended")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if isinstance(exc, _ResyncNeeded | aetcd.exceptions.RevisionCompactedError):
                    state = None  # the history to resume from is gone
                self.watch_failures += 1
                self._watch_error = f"etcd {self.url} unreachable: watch failed: {exc}"
                log.warning(
                    "etcd %s watch failed (%s: %s); reconnecting in %.1fs (failure %d)",
                    self.url,
                    type(exc).__name__,
                    exc,
                    backoff,
                    self.watch_failures,
                )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _MAX_BACKOFF_S)
            await self._reconnect()

    async def _reconnect(self) -> None:
        """A fresh client: whatever state the old channel and watcher were left in goes."""
        old, self._client = self._client, await self._make_client()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(old.close(), 1.0)

    async def _sync(self) -> tuple[_WatchState, aetcd.rtypes.Watch]:
        """Read the prefix at revision S, raise ring-epoch to S, watch from S + 1."""
        state = _WatchState()
        snapshot = await asyncio.wait_for(
            self._client.get_prefix(self._watch_prefix), self.timeout_s
        )
        start = snapshot.header.revision
        for kv in snapshot:
            state.apply_put(self, kv)
        state.change_rev = start  # covers whatever changed while nobody watched
        state.applied_rev = start
        self._publish(state)
        await asyncio.wait_for(self._bump(start), self.timeout_s)
        watch = await asyncio.wait_for(
            self._client.watch_prefix(self._watch_prefix, start_revision=start + 1),
            self.timeout_s,
        )
        return state, watch

    async def _resume(self, state: _WatchState) -> aetcd.rtypes.Watch:
        """Watch again from the last revision ``state`` applied."""
        probe = await asyncio.wait_for(self._client.get_prefix(self._epoch_key), self.timeout_s)
        if probe.header.revision < state.applied_rev:
            raise _ResyncNeeded(
                f"etcd is at revision {probe.header.revision}, behind {state.applied_rev}"
            )
        await self._rescue(state)
        if state.epoch is None or state.epoch < state.change_rev:
            # A failure cut the bump of the last change short; replaying its
            # event will not count as a change again, so bump it here.
            await asyncio.wait_for(self._bump(state.change_rev), self.timeout_s)
        # From the last applied revision itself, not the one after: a failure
        # may have cut a multi-key revision short, and replaying an event
        # applied already changes nothing (an identical member is no change,
        # a repeated bump is a failed compare).
        log.info("etcd %s: resuming the watch at revision %d", self.url, state.applied_rev)
        return await asyncio.wait_for(
            self._client.watch_prefix(self._watch_prefix, start_revision=state.applied_rev),
            self.timeout_s,
        )

    async def _rescue(self, state: _WatchState) -> None:
        """Put back the records of nodes that heartbeated to us while etcd could not hear.

        etcd counts lease time only while it runs, but a *hung* or
        partitioned etcd keeps counting, so a node that kept heartbeating
        through us can lose its lease. Its record comes back anyway on its
        next heartbeat (known=False, it registers again), but a router
        watching meanwhile would publish a ring without it, then with it:
        a flap. Putting the record back *before* the watch resumes means
        the delete and the put are seen together and no view without the
        node is published (docstring: a view waits for the epoch of the
        last change it has seen). Only records still missing are put, and
        only of nodes heard from within ttl_s, with a fresh lease: a node
        that died meanwhile expires one ttl later, as it would have.
        """
        now = time.monotonic()
        with self._lock:
            for name in [n for n, t in self._unheard.items() if now - t > self.ttl_s]:
                del self._unheard[name]  # silent for a ttl: not known to be alive
            recent = sorted(self._unheard)
        for name in recent:
            member = state.members.get(name)
            if member is None:
                continue
            lease = await self._client.lease(self._lease_ttl)
            put_back, _ = await self._client.transaction(
                compare=[tx.Version(self._key(name)) == 0],
                success=[
                    tx.Put(
                        self._key(name), members.to_pb(member).SerializeToString(), lease=lease.id
                    )
                ],
                failure=[],
            )
            if put_back:
                log.warning(
                    "node %s lost its etcd lease while etcd %s was unreachable; "
                    "its record is back (it kept heartbeating)",
                    name,
                    self.url,
                )
            else:
                await self._revoke(lease.id)
        with self._lock:  # done (a failure above leaves them for the next attempt)
            for name in recent:
                if self._unheard.get(name, now) <= now:
                    del self._unheard[name]

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
                await asyncio.wait_for(watch.cancel(), 1.0)

    async def _consume(self, watch: aetcd.rtypes.Watch, state: _WatchState) -> None:
        async for event in watch:
            rev = event.kv.mod_revision
            if event.kind == "PUT":
                changed = state.apply_put(self, event.kv)
            else:
                changed = state.apply_delete(self, event.kv)
            if changed:
                state.change_rev = max(state.change_rev, rev)
                await asyncio.wait_for(self._bump(rev), self.timeout_s)
            # Applied only once its bump is written, so a resumed watch
            # replays an event whose bump a failure cut short.
            state.applied_rev = max(state.applied_rev, rev)
            self._publish(state)

    async def _probe(self) -> None:
        """Fail the watch when etcd stops answering (a hung stream raises nothing)."""
        interval = max(0.5, min(self.ttl_s / 2, 2.0))
        while True:
            await asyncio.sleep(interval)
            await asyncio.wait_for(self._client.get(self._epoch_key), self.timeout_s)
            self._call_error = None  # etcd answers: an older failed call is history

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
        if state.epoch is None or state.epoch < state.change_rev:
            return  # the epoch for this view is not written yet
        old = self._cell.get()
        new = MembershipView(state.epoch, state.ring(), state.table())
        if old == new:
            return
        old_names = {m.name for m in old.members}
        new_names = {m.name for m in new.members}
        log.info(
            "ring epoch %d: %d members (joined %s, left %s), %d invalidations",
            new.epoch,
            len(new.members),
            sorted(new_names - old_names),
            sorted(old_names - new_names),
            len(new.invalidations),
        )
        self._cell.set(new)
        self._synced.set()


class _WatchState:
    """What the watch has seen: member records, invalidations and ring-epoch."""

    def __init__(self) -> None:
        self.members: dict[str, RingMember] = {}
        self.invalidations: dict[str, int] = {}
        self.epoch: int | None = None
        self.change_rev = 0  # revision of the last effective change
        self.applied_rev = 0  # the last revision applied (where a watch resumes)

    def ring(self) -> tuple[RingMember, ...]:
        return tuple(self.members[name] for name in sorted(self.members))

    def table(self) -> tuple[tuple[str, int], ...]:
        return tuple(sorted(self.invalidations.items()))

    def apply_put(self, owner: EtcdMembership, kv: aetcd.rtypes.KeyValue) -> bool:
        """Apply one key's new value; True when the view changed (an effective change)."""
        if kv.key == owner._epoch_key:
            try:
                self.epoch = int(kv.value)
            except ValueError:
                log.error("etcd key %r holds %r, not an epoch; ignored", kv.key, kv.value)
            return False
        if kv.key.startswith(owner._inv_prefix):
            prefix = _invalidated(kv.key[len(owner._inv_prefix) :])
            if prefix is None:
                return False
            self.invalidations[prefix] = kv.mod_revision
            return True
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
        if kv.key.startswith(owner._inv_prefix):
            prefix = _invalidated(kv.key[len(owner._inv_prefix) :])
            return prefix is not None and self.invalidations.pop(prefix, None) is not None
        if not kv.key.startswith(owner._members_prefix):
            return False
        name = kv.key[len(owner._members_prefix) :].decode(errors="replace")
        return self.members.pop(name, None) is not None


def _invalidated(segment: bytes) -> str | None:
    """The prefix an invalidations/ key names; None (logged) for a foreign key."""
    try:
        return decode_prefix(segment)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        log.error("etcd key segment %r is not an encoded prefix; ignored", segment)
        return None
