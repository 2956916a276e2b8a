"""Epoch fencing before a node's first write or read of a new epoch.

A node that writes under epoch E while another node still serves reads under
an older epoch could let that node return a value this write replaced (the
key moved here; the old owner does not know yet). The other way round too: a
node that serves reads under E (a key that moved here, fetched from its
previous owner or pushed by it) while the key's old replicas still take
writes under the older epoch would go on returning what it holds after a
newer value was written there (the soak saw it: a restarted node, primary
of a key again, served the copy it had fetched while a writer still on the
old ring wrote the key twice more on the old replicas). So before its first
assigned-version commit *and* its first client read under a new epoch, a
node asks every other member of its previous and current rings to come up
to E (``Node.Fence``; each asks the router). After that, a client on an
older epoch is refused everywhere (FAILED_PRECONDITION) and refreshes, so
its writes go to the new owners. Once per epoch: the fenced epoch is
remembered. A member that does not answer is taken to be dead (a dead
process serves nothing); partitions are outside the guarantee
(docs/consistency.md, "Epoch fencing").
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

from tensorcache.node.peers import Peers
from tensorcache.node.rings import RingView

log = logging.getLogger("tensorcache.node")

FENCE_TIMEOUT_S = 1.0  # per member; one that takes longer is presumed dead


class Fencer:
    def __init__(
        self, rings: RingView, peers: Peers, *, timeout_s: float = FENCE_TIMEOUT_S
    ) -> None:
        self._rings = rings
        self._peers = peers
        self._timeout_s = timeout_s
        self._fenced = 0
        self._lock = threading.Lock()  # one fence round at a time; writers wait for it
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="fence")

    @property
    def fenced(self) -> int:
        """The newest epoch this node has fenced its peers at."""
        return self._fenced

    def before_serving(self) -> None:
        """Fence the peers if the current ring's epoch has not been fenced yet.

        Before a write commits and before a client read is answered.
        """
        ring = self._rings.current
        if ring is None or ring.epoch <= self._fenced:
            return
        with self._lock:
            ring = self._rings.current
            if ring is None or ring.epoch <= self._fenced:
                return
            epoch = ring.epoch
            peers = self._rings.peers()
            futures = {
                m.name: self._pool.submit(self._peers.fence, m.address, epoch, self._timeout_s)
                for m in peers
            }
            for name, fut in futures.items():
                try:
                    theirs = fut.result()
                except Exception as exc:  # TensorCacheError, or a bug: never fail the write
                    log.warning(
                        "fence at epoch %d: %s unreachable, presumed dead: %s", epoch, name, exc
                    )
                    continue
                if theirs < epoch:
                    log.warning("fence at epoch %d: %s is still at %d", epoch, name, theirs)
            self._fenced = epoch

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
