"""Rebalance: every entry reaches every member of its key's current replica set.

This is what keeps an acknowledged put through any sequence of ring changes
(docs/consistency.md, "Warm rebalance"). Each entry carries its *holders*:
the members, by incarnation (name, address, process), known to hold a copy
at least as new. A client's put records the replica set it was written to;
a copy pushed here records this node. The rule, after any ring change:

    push each entry held here to the members of its current replica set
    that are not among its holders; a confirmed push adds the target.
    A demoted entry (owned elsewhere now) whose holders cover its whole
    replica set has moved: it is dropped (``moved``).

The rule looks only at the entry and the *newest* ring, so it holds however
many epochs pass: a stripe put at epoch 4 on node-0 and read at epoch 8 is
pushed by node-0 to its epoch-8 owners, whatever happened in between (the
per-change plan this replaced lost such entries when a newer change
superseded its run, or when the holder was not a replica of the ring just
before). A node restarted under its name comes back as a new incarnation,
so its peers refill it. Pushes are keep-newer handoff writes (node/drain.py),
so pushing twice, or from two holders, is harmless.

One thread per node does it, off the data path and off the membership
agent's thread (a heartbeat never waits behind it): a ring change only
flags a scan, which walks the store a few hundred keys at a time, judging
each (node/store.py ``judge``: invalidation, demotion) under the store's
lock for one chunk only, and pushing in batches. After each chunk it
pauses while gets are being served, in proportion to the CPU the chunk
took (node/pace.py: at most 2x slower by default, never stalled). A newer
ring restarts the scan: the rule is stateless, so nothing is lost by
starting over. Pushes that fail (a target down or leaving) are retried
with backoff until the ring drops the target. A SIGTERM drain runs the same rule against the ring
without this node, in rounds, until nothing is missing or time runs out.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from tensorcache.node.drain import CALL_TIMEOUT_S, TargetFailed, batches, push_batch
from tensorcache.node.pace import Pacer
from tensorcache.node.peers import Peers
from tensorcache.node.rings import RingView
from tensorcache.node.store import Entry, Holder, Store, StoreKey
from tensorcache.ring import Ring, RingMember

log = logging.getLogger("tensorcache.node")

# Keys judged per hold of the store's lock.
CHUNK = 256
# Entries queued per target before they are pushed (one batch's worth).
FLUSH_ENTRIES = 256
FLUSH_BYTES = 16 * 1024 * 1024
RETRY_MIN_S = 0.5
RETRY_MAX_S = 10.0


@dataclass
class _Round:
    """One pass over some keys against one ring."""

    ring: Ring
    me: str
    queues: dict[str, list[tuple[Entry, frozenset[Holder], Holder]]] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    failed: set[str] = field(default_factory=set)
    missing: int = 0  # copies found missing
    pushed: int = 0  # copies confirmed
    moved: int = 0
    unresolved: int = 0  # hidden copies of our keys still undecided


class Rebalancer:
    def __init__(
        self,
        me: str,
        store: Store,
        rings: RingView,
        peers: Peers,
        *,
        enabled: bool = True,
        chunk: int = CHUNK,
        clock: Callable[[], float] = time.monotonic,
        resolve: Callable[[list[StoreKey]], object] | None = None,
        pacer: Pacer | None = None,
    ) -> None:
        self._me = me
        # Background scans yield to the data path (node/pace.py); None: never pause.
        self._pacer = pacer if pacer is not None else Pacer(lambda: False)
        # Decides hidden copies of keys this node owns (node/handoff.py
        # ``fetch``: newest wins, dropped if outdone or deleted, else revived).
        self._resolve = resolve
        self._store = store
        self._rings = rings
        self._peers = peers
        self._enabled = enabled
        self._chunk = chunk
        self._clock = clock
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._full = False
        self._dirty: set[StoreKey] = set()
        self._generation = 0
        self._closed = False
        self._thread: threading.Thread | None = None
        self.pushed = 0  # copies confirmed by background pushes
        self.drained = 0  # copies confirmed by drains
        #: Work left: keys the running scan has not reached, plus copies the
        #: scans found missing and could not push yet, plus hidden copies of
        #: this node's keys not yet decided (0: every entry held here is at
        #: every member of its replica set, as far as this node knows).
        self.pending = 0
        # What the last full scan left undone, and what partial (dirty-key)
        # scans left since: a partial scan that went well says nothing about
        # the copies a full scan could not push, so it neither clears their
        # retry nor lowers ``pending`` below them.
        self._left_full = 0
        self._left_partial = 0

    # -- triggers -------------------------------------------------------------------
    def ring_changed(self) -> None:
        """Placement changed: scan everything (in the background)."""
        with self._lock:
            self._full = True
            self._generation += 1
            if self._enabled:
                self.pending = max(self.pending, 1)  # unknown until the scan has run
        self._kick()

    def dirty(self, keys: Iterable[StoreKey]) -> None:
        """These keys were committed under a ring older than the current one: look at them."""
        with self._lock:
            self._dirty.update(keys)
        self._kick()

    def _kick(self) -> None:
        if not self._enabled:
            return
        with self._lock:
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._loop, name="rebalance", daemon=True)
                self._thread.start()
        self._wake.set()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the background scan (before a drain, or at exit)."""
        with self._lock:
            self._closed = True
            thread = self._thread
        self._wake.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def scan_now(self) -> int:
        """Run one full scan in the caller's thread; returns the copies confirmed.

        For tests and tools; the node itself scans in the background.
        """
        rnd = self._scan(self._store.keys(), self._generation)
        return rnd.pushed if rnd is not None else 0

    # -- the background loop ----------------------------------------------------------
    def _loop(self) -> None:
        retry_s = RETRY_MIN_S
        retry_at: float | None = None
        while True:
            timeout = None if retry_at is None else max(0.0, retry_at - self._clock())
            self._wake.wait(timeout)
            with self._lock:
                if self._closed:
                    return
                self._wake.clear()
                full = self._full or (retry_at is not None and self._clock() >= retry_at)
                dirty = self._dirty
                self._full, self._dirty = False, set()
                generation = self._generation
            if not full and not dirty:
                continue
            try:
                keys: Sequence[StoreKey] = self._store.keys() if full else list(dirty)
                done = self._scan(keys, generation, full=full)
            except Exception:  # background work: log, never kill the node
                log.exception("rebalance scan failed")
                done = None
            if done is None or done.failed or done.unresolved:
                retry_at = self._clock() + retry_s  # the retry is a full scan
                retry_s = min(retry_s * 2, RETRY_MAX_S)
            elif full:
                retry_at, retry_s = None, RETRY_MIN_S
            # A partial scan that went well keeps a full scan's retry: clearing
            # it abandoned the copies a full scan could not push to a member
            # that was down (restarted empty) until the next ring change, and
            # ``pending`` read 0 meanwhile (the soak caught 1,182 copies held
            # that way, demoted on one node, for minutes).

    def _superseded(self, generation: int) -> bool:
        return self._generation != generation or self._closed

    def _scan(
        self, keys: Sequence[StoreKey], generation: int, *, full: bool = True
    ) -> _Round | None:
        """One pass over ``keys`` (``full``: every key held; else the dirty ones)."""
        ring = self._rings.current
        if ring is None or self._me not in ring:
            return _Round(ring, self._me) if ring is not None else None
        start = self._clock()
        paused = self._pacer.paused_s
        rnd = _Round(ring, self._me)
        # Work a partial scan does not cover: what earlier scans left undone.
        base = 0 if full else self._left_full + self._left_partial
        for i in range(0, len(keys), self._chunk):
            if self._superseded(generation):
                return rnd  # a newer ring: its scan covers everything
            began = time.thread_time()  # CPU: a push waiting on its peer takes none
            suspects = self._plan(self._store.judge(keys[i : i + self._chunk]), rnd)
            if suspects and self._resolve is not None:
                self._decide(suspects, rnd)
            else:
                rnd.unresolved += len(suspects)
            self._flush(rnd, final=False)
            self.pending = base + len(keys) - i + rnd.missing - rnd.pushed + rnd.unresolved
            self._pacer.after(time.thread_time() - began)  # the data path goes first
        self._flush(rnd, final=True)
        left = max(0, rnd.missing - rnd.pushed) + rnd.unresolved
        with self._lock:
            self.pushed += rnd.pushed
            if full:
                self._left_full, self._left_partial = left, 0
            else:
                self._left_partial += left
            self.pending = self._left_full + self._left_partial
        if rnd.missing or rnd.moved or rnd.unresolved:
            log.info(
                "epoch %d: %d keys checked, %d copies pushed of %d missing, %d moved away, "
                "%d hidden copies undecided in %.2fs (%.2fs paused)%s",
                ring.epoch,
                len(keys),
                rnd.pushed,
                rnd.missing,
                rnd.moved,
                rnd.unresolved,
                self._clock() - start,
                self._pacer.paused_s - paused,
                f"; unreachable: {sorted(rnd.failed)}" if rnd.failed else "",
            )
        return rnd

    # -- one round's work ---------------------------------------------------------------
    def _decide(self, suspects: list[StoreKey], rnd: _Round) -> None:
        """Decide hidden copies now, as a read would, then plan what survives.

        Waiting for a read lost acknowledged puts: a copy hidden after a gap
        (a pause) was the only one left once the key's other holder crashed,
        and a crash of this node then took it too, with no read in between.
        """
        try:
            self._resolve(suspects)  # type: ignore[misc]  # checked by the caller
        except Exception:  # background work: a peer's failure is a retry
            log.exception("rebalance: deciding %d hidden copies failed", len(suspects))
            rnd.unresolved += len(suspects)
            return
        rnd.unresolved += len(self._plan(self._store.judge(suspects), rnd))

    def _plan(self, entries: list[Entry], rnd: _Round) -> list[StoreKey]:
        """Queue the missing copies of ``entries``; return the keys of hidden ones of ours."""
        suspects: list[StoreKey] = []
        for entry in entries:
            replicas: tuple[RingMember, ...] = rnd.ring.replica_set(entry.key[1])
            if entry.demoted and any(m.name == self._me for m in replicas):
                # Hidden although ours: its key lived elsewhere meanwhile, so it
                # may be stale. Pushing it could bring back a key deleted there;
                # it is decided first (node/handoff.py: newest wins, or revive).
                suspects.append(entry.key)
                continue
            wanted = frozenset(m.incarnation_key for m in replicas)
            missing = [m for m in replicas if m.incarnation_key not in entry.holders]
            missing = [m for m in missing if m.name != self._me]
            if not missing:
                if entry.demoted and self._store.drop_moved(entry, wanted):
                    rnd.moved += 1
                continue
            for m in missing:
                rnd.missing += 1
                if m.address in rnd.failed:
                    continue
                rnd.queues.setdefault(m.address, []).append((entry, wanted, m.incarnation_key))
                rnd.sizes[m.address] = rnd.sizes.get(m.address, 0) + sum(
                    len(c) for c in entry.chunks
                )
        return suspects

    def _flush(self, rnd: _Round, *, final: bool) -> None:
        for address in list(rnd.queues):
            queue = rnd.queues[address]
            if not final and len(queue) < FLUSH_ENTRIES and rnd.sizes[address] < FLUSH_BYTES:
                continue
            del rnd.queues[address]
            rnd.sizes.pop(address, None)
            if address in rnd.failed:
                continue
            by_entry = {id(e): (w, h) for e, w, h in queue}
            for batch in batches([e for e, _, _ in queue]):
                try:
                    confirmed = push_batch(self._peers, address, batch, CALL_TIMEOUT_S)
                except TargetFailed as exc:
                    log.info("rebalance: %s; retrying later", exc)
                    rnd.failed.add(address)
                    break
                for entry in confirmed:
                    wanted, holder = by_entry[id(entry)]
                    rnd.pushed += 1
                    if self._store.add_holders(entry, (holder,), wanted):
                        rnd.moved += 1

    # -- SIGTERM drain ----------------------------------------------------------------------
    def drain(self, fetch_ring: Callable[[], Ring | None], timeout_s: float) -> int:
        """Push every entry to its replica set in the ring without this node.

        Rounds until a round finds nothing missing, with no put committed or
        in flight meanwhile, or ``timeout_s`` runs out;
        each round takes the newest ring from ``fetch_ring`` (other nodes may
        be leaving too: a copy pushed to one that left is pushed again to the
        key's owner after it). Returns the copies confirmed.
        """
        self.close()
        deadline = self._clock() + timeout_s
        total = 0
        done = False
        rnd: _Round | None = None
        ring = fetch_ring()
        while ring is not None and ring.members and self._clock() < deadline:
            # A client's put admitted just before we left the ring may still
            # be streaming in and commit after a round looked: such a round
            # cannot be the last (its put returned, so it must not be lost).
            before = self._store.stats()
            rnd = _Round(ring, self._me)
            keys = [e.key for e in self._store.hottest()]  # what is read most goes first
            for i in range(0, len(keys), self._chunk):
                if self._clock() >= deadline:
                    break
                self._plan(self._store.judge(keys[i : i + self._chunk]), rnd)
                self._flush(rnd, final=False)
                # Yield, never pause: a drain runs against its deadline, and
                # what it has not handed over then leaves with the process.
                time.sleep(0)
            self._flush(rnd, final=True)
            total += rnd.pushed
            after = self._store.stats()
            quiet = after.puts == before.puts and after.bytes_reserved == 0
            if quiet and not rnd.failed and (rnd.missing == rnd.pushed or rnd.pushed == 0):
                done = True
                break  # all there, or the rest refused for room: rounds won't help
            if not quiet and rnd.missing == rnd.pushed:
                time.sleep(min(0.02, max(0.0, deadline - self._clock())))  # let it land
            if rnd.failed:  # a target left or died: wait for the ring to say so
                time.sleep(min(0.2, max(0.0, deadline - self._clock())))
            ring = fetch_ring() or ring
        if not done and ring is not None and ring.members:
            # Acknowledged puts held only here leave with this process: say so.
            log.warning(
                "drain: --drain-timeout (%.0f s) ran out with copies not handed over "
                "(last round: %d missing, %d pushed); raise it for a node this size",
                timeout_s,
                rnd.missing if rnd is not None else 0,
                rnd.pushed if rnd is not None else 0,
            )
        with self._lock:
            self.drained += total
        return total
