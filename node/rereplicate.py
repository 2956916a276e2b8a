"""Re-replication: after a ring change, give every new replica its copy.

Handoff on a miss (node/handoff.py) warms a key's new owner lazily, which is
enough for one change. It is not enough for the next one: if a key's
replica set moved from (A, B) to (A, C) and C never read the key, A holds
the only copy; killing A now loses it, although R = 2. So after every ring
change each node pushes the entries it held under the previous ring to the
members of each key's new replica set that were not in its previous one,
in the background, most recently used first, within a time bound:

* a member "was in the previous set" only if it is the same incarnation
  (same name *and* address): a node restarted under its old name comes
  back empty and must be refilled by its peers, though the ring's names did
  not change;
* pushes are versioned handoff writes (version and stamp kept); a target
  that took a newer put keeps it, and one that saw the key deleted or
  written since the change ignores the push (node/ops.py), so a push never
  resurrects or rolls back anything;
* every holder of the key pushes (up to R copies of each push): the
  targets' keep-newer rule makes that idempotent, and nobody has to know
  which holders are alive;
* a newer ring cancels the run in progress; the new run covers it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from tensorcache.node import drain
from tensorcache.node.peers import Peers
from tensorcache.node.store import Entry
from tensorcache.router.ring import Ring, RingMember

log = logging.getLogger("tensorcache.node")

# Bound of one run. Moving 1/N of a node's memory at loopback speed takes
# seconds; what is left when it runs out is still reachable by handoff.
TIMEOUT_S = 60.0


def targets(entry_key: str, old: Ring, new: Ring, me: str) -> list[RingMember]:
    """Members of ``entry_key``'s new replica set that lack a copy we can vouch for."""
    before = {(m.name, m.address) for m in old.replica_set(entry_key)} if old.members else set()
    if not any(name == me for name, _ in before):
        return []  # we did not hold it as a replica: not ours to spread
    return [
        m for m in new.replica_set(entry_key) if m.name != me and (m.name, m.address) not in before
    ]


def plan(entries: list[Entry], old: Ring, new: Ring, me: str) -> dict[str, list[Entry]]:
    """Target address -> entries to push there (in the given order)."""
    queues: dict[str, list[Entry]] = {}
    if me not in old or not new.members:
        return queues
    for entry in entries:
        for member in targets(entry.key[1], old, new, me):
            queues.setdefault(member.address, []).append(entry)
    return queues


class Rereplicator:
    """Runs one background push per ring change; a newer change cancels the older run."""

    def __init__(
        self,
        me: str,
        peers: Peers,
        entries: Callable[[], list[Entry]],
        *,
        timeout_s: float = TIMEOUT_S,
    ) -> None:
        self._me = me
        self._peers = peers
        self._entries = entries  # hottest first, stale ones left out
        self._timeout_s = timeout_s
        self._lock = threading.Lock()
        self._generation = 0
        self.pushed = 0

    def ring_changed(self, old: Ring | None, new: Ring) -> None:
        if old is None or self._timeout_s <= 0:
            return
        with self._lock:
            self._generation += 1
            generation = self._generation
        threading.Thread(
            target=self._run, args=(old, new, generation), name="rereplicate", daemon=True
        ).start()

    def _run(self, old: Ring, new: Ring, generation: int) -> None:
        try:
            queues = plan(self._entries(), old, new, self._me)
            if not queues:
                return
            start = time.monotonic()
            deadline = start + self._timeout_s
            done = 0
            for address, queue in queues.items():
                if self._generation != generation:
                    log.info("re-replication for epoch %d superseded", new.epoch)
                    break
                done += drain.push(self._peers, address, queue, deadline, what="re-replicate")
            with self._lock:
                self.pushed += done
            log.info(
                "epoch %d: pushed %d copies to %d new replicas in %.2fs",
                new.epoch,
                done,
                len(queues),
                time.monotonic() - start,
            )
        except Exception:  # background work: log, never kill the node
            log.exception("re-replication for epoch %d failed", new.epoch)
