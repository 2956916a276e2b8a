"""Fan-out: items grouped per node, sent in parallel, retried and failed over.

The one place the client's failure policy lives. ``scatter(items, call)``
places every item with one ring snapshot (``ring.replica_set(key)[item.replica]``),
groups them per node into RPC-sized batches, runs the batches on the
client's thread pool, and then:

* with ``failover`` (reads): an unreachable node sends its items to the
  key's next replica at once, with no wait;
* otherwise, and once every replica failed: a stale epoch or an unreachable
  node refreshes the ring and retries just the failed items, up to
  ``retries`` times with exponential backoff (counted in metrics);
* any other error is raised once all batches finished.

A public call submits tasks and waits; tasks never submit tasks, so the pool
cannot deadlock.
"""

from __future__ import annotations

import functools
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future
from typing import Protocol, TypeVar

from tensorcache.client.config import ClientConfig
from tensorcache.client.placement import Placement
from tensorcache.errors import StaleEpoch, TensorCacheError, Unavailable
from tensorcache.ring import Ring, RingMember


class Item(Protocol):
    """What the fan-out needs of a work item (client/items.py)."""

    key: str
    replica: int
    skip: str  # a member to leave out of the key's replica set ("": none)
    placed: str  # set here once the item succeeded: the member that took it

    @property
    def nbytes(self) -> int: ...


T = TypeVar("T", bound=Item)
Call = Callable[[RingMember, int, list[T]], None]
Count = Callable[..., None]


class FanOut:
    def __init__(
        self, placement: Placement, pool: Executor, config: ClientConfig, count: Count
    ) -> None:
        self._placement = placement
        self._pool = pool
        self._config = config
        self._count = count

    def batches(self, items: list[T]) -> list[list[T]]:
        """Split one node's items into RPC-sized batches."""
        out: list[list[T]] = []
        cur: list[T] = []
        size = 0
        for it in items:
            n = it.nbytes
            if cur and (size + n > self._config.batch_bytes or len(cur) >= self._config.batch_keys):
                out.append(cur)
                cur, size = [], 0
            cur.append(it)
            size += n
        if cur:
            out.append(cur)
        return out

    def run_all(self, fns: list[Callable[[], None]]) -> list[BaseException | None]:
        """Run ``fns`` (in parallel when more than one); each one's exception or None."""
        if len(fns) == 1:
            try:
                fns[0]()
                return [None]
            except Exception as exc:
                return [exc]
        futs: list[Future[None]] = [self._pool.submit(fn) for fn in fns]
        return [f.exception() for f in futs]

    def _place(
        self, pending: list[T], ring: Ring, taken: dict[str, set[str]]
    ) -> list[tuple[RingMember, list[T]]]:
        """(member, batch) for every item that has a home in ``ring``."""
        if len(pending) == 1 and not pending[0].skip and not taken:
            # One key (a get, a put, a version check): its member, no grouping.
            # The same answer as below, without its dicts (#18: per-call cost).
            it = pending[0]
            copies = ring.replica_set(it.key)
            return [(copies[it.replica], [it])] if it.replica < len(copies) else []
        groups: dict[str, list[T]] = defaultdict(list)
        members: dict[str, RingMember] = {}
        nth: dict[str, int] = defaultdict(int)
        for it in pending:
            copies = ring.replica_set(it.key)
            if it.skip:
                copies = tuple(m for m in copies if m.name != it.skip)
            slot = it.replica
            done = taken.get(it.key)
            if done:
                copies = tuple(m for m in copies if m.name not in done)
                slot = nth[it.key]
                nth[it.key] += 1
            if slot >= len(copies):
                continue  # fewer members than replicas: this copy has no home
            member = copies[slot]
            members[member.name] = member
            groups[member.name].append(it)
        return [
            (members[name], batch)
            for name, group in groups.items()
            for batch in self.batches(group)
        ]

    def scatter(self, items: Sequence[T], call: Call[T], *, failover: bool = False) -> None:
        """Run ``call`` on every item, grouped by node, in parallel (see the module doc)."""
        pending = list(items)
        last: TensorCacheError | None = None
        attempt = 0
        # Writes: the members that took a copy of each key. A retry places the
        # copies still missing on the other members of the ring of the
        # moment; by index, two copies could land on one node (the ring moved
        # a key's old primary to index 1), and a crash of it lost both.
        taken: dict[str, set[str]] = defaultdict(set)
        while True:
            ring = self._placement.current()
            tasks = self._place(pending, ring, taken)
            results = self.run_all(
                [functools.partial(call, member, ring.epoch, batch) for member, batch in tasks]
            )
            failed: list[T] = []
            moved: list[T] = []
            fatal: TensorCacheError | None = None
            stale_epoch = 0
            for (member, batch), exc in zip(tasks, results, strict=True):
                if exc is None:
                    for it in batch:
                        it.placed = member.name
                        if not failover:
                            taken[it.key].add(member.name)
                    continue
                if isinstance(exc, StaleEpoch):
                    stale_epoch = max(stale_epoch, exc.epoch)
                    failed.extend(batch)
                elif isinstance(exc, Unavailable):
                    for it in batch:
                        if failover and it.replica + 1 < len(ring.replica_set(it.key)):
                            it.replica += 1
                            moved.append(it)
                        else:
                            failed.append(it)
                elif isinstance(exc, TensorCacheError):
                    fatal = fatal or exc
                else:
                    raise exc
                last = exc if isinstance(exc, TensorCacheError) else last
            if fatal is not None:
                raise fatal
            if moved:
                self._count("failovers", len(moved))
            if failover:
                for it in failed:
                    it.replica = 0  # a new ring: its primary first
            if not failed and not moved:
                return
            pending = failed + moved
            if not failed:
                continue  # only failovers: same ring, next replicas, no wait
            self._count("retries")
            if attempt >= self._config.retries:
                break
            if stale_epoch == 0:  # unreachable node: give membership time to notice
                time.sleep(self._config.retry_backoff_s * (2 ** min(attempt, 4)))
            attempt += 1
            try:
                self._placement.refresh(ring, stale_epoch)
            except Unavailable as exc:
                last = exc
        raise last if last is not None else Unavailable("retries exhausted")
