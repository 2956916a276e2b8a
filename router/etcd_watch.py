"""The watch that builds a router's view from etcd, and keeps it through outages.

Every router watches the prefix and builds its view from the watch alone
(router/etcd_state.py decides what is an effective change). For an effective
change at revision R the watch runs the transaction "if ring-epoch < R or
absent, put ring-epoch = R" (``_bump``). On a full (re)synchronisation it
does the same with the revision S of its initial range, which also covers
leases that expired while no router was watching. A view is published into
the membership's ``ViewCell`` only when the ring-epoch seen is >= the
revision of the last effective change seen.

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
resuming its watch, the router puts back the records of those nodes (the
``rescue`` it is given: ``NodeLeases.rescue``), so the expiry and the
return land together and no ring without them is published.

The loop reconnects with backoff after any failure, logs it and counts it
in the health's ``watch_failures``; while etcd is down the last published
view stays, and the health says degraded until the watch is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable, Mapping

import aetcd
import aetcd.exceptions
from aetcd import transactions as tx

from tensorcache.ring import RingMember
from tensorcache.router.etcd_conn import EtcdConnection
from tensorcache.router.etcd_health import EtcdHealth
from tensorcache.router.etcd_records import EtcdKeys, epoch_value
from tensorcache.router.etcd_state import WatchState
from tensorcache.router.membership import ViewCell

log = logging.getLogger("tensorcache.router")

_MAX_BACKOFF_S = 2.0

#: Called with the members last seen, before a watch resumes (NodeLeases.rescue).
Rescue = Callable[[Mapping[str, RingMember]], Awaitable[None]]


class _ResyncNeeded(Exception):
    """The watch cannot resume where it stopped; read everything again."""


class EtcdWatch:
    """Runs (``run``, on the connection's loop) the watch that publishes views into ``cell``."""

    def __init__(
        self,
        conn: EtcdConnection,
        keys: EtcdKeys,
        health: EtcdHealth,
        cell: ViewCell,
        *,
        ttl_s: float,
        rescue: Rescue,
    ) -> None:
        self._conn = conn
        self._keys = keys
        self._health = health
        self._cell = cell
        self._ttl_s = ttl_s
        self._rescue = rescue
        self._timeout_s = conn.timeout_s
        self._synced = threading.Event()

    def wait_synced(self, timeout: float) -> bool:
        """Whether a first view was published within ``timeout`` seconds."""
        return self._synced.wait(timeout)

    async def run(self) -> None:
        """Synchronise, then watch and resume, forever; every failure is logged and counted."""
        backoff = 0.1
        state: WatchState | None = None
        while True:
            try:
                if state is None:
                    state, watch = await self._sync()
                else:
                    watch = await self._resume(state)
                self._health.watch_up()
                backoff = 0.1
                await self._watch(watch, state)
                raise ConnectionError("watch stream ended")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if isinstance(exc, _ResyncNeeded | aetcd.exceptions.RevisionCompactedError):
                    state = None  # the history to resume from is gone
                url = self._conn.url
                failures = self._health.watch_failed(f"etcd {url} unreachable: watch failed: {exc}")
                log.warning(
                    "etcd %s watch failed (%s: %s); reconnecting in %.1fs (failure %d)",
                    url,
                    type(exc).__name__,
                    exc,
                    backoff,
                    failures,
                )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _MAX_BACKOFF_S)
            await self._conn.reconnect()

    async def _sync(self) -> tuple[WatchState, aetcd.rtypes.Watch]:
        """Read the prefix at revision S, raise ring-epoch to S, watch from S + 1."""
        state = WatchState(self._keys)
        snapshot = await asyncio.wait_for(
            self._conn.client.get_prefix(self._keys.watch), self._timeout_s
        )
        start = snapshot.header.revision
        for kv in snapshot:
            state.apply_put(kv)
        state.change_rev = start  # covers whatever changed while nobody watched
        state.applied_rev = start
        self._publish(state)
        await asyncio.wait_for(self._bump(start), self._timeout_s)
        watch = await asyncio.wait_for(
            self._conn.client.watch_prefix(self._keys.watch, start_revision=start + 1),
            self._timeout_s,
        )
        return state, watch

    async def _resume(self, state: WatchState) -> aetcd.rtypes.Watch:
        """Watch again from the last revision ``state`` applied."""
        probe = await asyncio.wait_for(
            self._conn.client.get_prefix(self._keys.epoch), self._timeout_s
        )
        if probe.header.revision < state.applied_rev:
            raise _ResyncNeeded(
                f"etcd is at revision {probe.header.revision}, behind {state.applied_rev}"
            )
        await self._rescue(state.members)
        if not state.epoch_written():
            # A failure cut the bump of the last change short; replaying its
            # event will not count as a change again, so bump it here.
            await asyncio.wait_for(self._bump(state.change_rev), self._timeout_s)
        # From the last applied revision itself, not the one after: a failure
        # may have cut a multi-key revision short, and replaying an event
        # applied already changes nothing (an identical member is no change,
        # a repeated bump is a failed compare).
        log.info("etcd %s: resuming the watch at revision %d", self._conn.url, state.applied_rev)
        return await asyncio.wait_for(
            self._conn.client.watch_prefix(self._keys.watch, start_revision=state.applied_rev),
            self._timeout_s,
        )

    async def _watch(self, watch: aetcd.rtypes.Watch, state: WatchState) -> None:
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

    async def _consume(self, watch: aetcd.rtypes.Watch, state: WatchState) -> None:
        async for event in watch:
            rev = event.kv.mod_revision
            if event.kind == "PUT":
                changed = state.apply_put(event.kv)
            else:
                changed = state.apply_delete(event.kv)
            if changed:
                state.change_rev = max(state.change_rev, rev)
                await asyncio.wait_for(self._bump(rev), self._timeout_s)
            # Applied only once its bump is written, so a resumed watch
            # replays an event whose bump a failure cut short.
            state.applied_rev = max(state.applied_rev, rev)
            self._publish(state)

    async def _probe(self) -> None:
        """Fail the watch when etcd stops answering (a hung stream raises nothing)."""
        interval = max(0.5, min(self._ttl_s / 2, 2.0))
        while True:
            await asyncio.sleep(interval)
            await asyncio.wait_for(self._conn.client.get(self._keys.epoch), self._timeout_s)
            self._health.call_ok()  # etcd answers: an older failed call is history

    async def _bump(self, revision: int) -> None:
        await raise_epoch(self._conn.client, self._keys, revision)

    def _publish(self, state: WatchState) -> None:
        if not state.epoch_written():
            return  # the epoch for this view is not written yet
        old = self._cell.get()
        new = state.view()
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


async def raise_epoch(client: aetcd.Client, keys: EtcdKeys, revision: int) -> None:
    """Raise ring-epoch to ``revision`` unless it is already there (or past it).

    The one write of ring-epoch (router/etcd_membership.py argues why it is
    safe for any revision already reached); router/etcd_restore.py uses it too.
    """
    key, value = keys.epoch, epoch_value(revision)
    raise_it = tx.Txn(
        compare=[tx.Value(key) < value],
        success=[tx.Put(key, value)],
        failure=[],
    )
    await client.transaction(
        compare=[tx.Version(key) > 0],
        success=[raise_it],
        failure=[tx.Put(key, value)],
    )
