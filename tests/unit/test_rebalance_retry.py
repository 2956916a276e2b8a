"""The rebalance scan's retries and its ``pending`` count (node/rebalance.py).

A full scan that cannot push some copies (their new owner is down) retries
with a backoff. A partial scan of a few dirty keys (a put that streamed in
across a ring change) that goes well must not cancel that retry, nor make
``pending`` read 0 while copies are still missing: the soak caught a node
holding 1,182 copies that way, never pushed until the next ring change,
with ``pending`` 0.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable

import pytest

from tensorcache.node.rebalance import Rebalancer
from tensorcache.node.store import Entry, StoreKey
from tensorcache.ring import Ring, RingMember
from tests.unit.test_node_ops import Cluster, get, put

pytestmark = pytest.mark.unit

DEADLINE_S = 20.0


def _poll(ok, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not ok():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {DEADLINE_S:.0f}s: {what}")
        time.sleep(0.01)


class JudgeSpy:
    """Records the key lists the scan judges (to know a partial scan ran)."""

    def __init__(self, judge) -> None:
        self._judge = judge
        self.calls: list[list[StoreKey]] = []
        self.lock = threading.Lock()

    def __call__(self, keys: Iterable[StoreKey]) -> list[Entry]:
        keys = list(keys)
        with self.lock:
            self.calls.append(keys)
        return self._judge(keys)

    def saw(self, keys: list[StoreKey]) -> bool:
        with self.lock:
            return keys in self.calls


def test_a_partial_scan_keeps_the_retry_of_copies_a_full_scan_could_not_push():
    cl = Cluster("a", "b", "c")
    cl.install(cl.ring("a"))
    keys = [f"k{i}" for i in range(60)]
    for k in keys:
        put(cl["a"], k, k.encode())
    ring = cl.ring("a", "b", "c")
    cl.install(ring)
    to_b = [k for k in keys if ring.owner(k).name == "b"]
    to_c = [k for k in keys if ring.owner(k).name == "c"]
    stays = [k for k in keys if ring.owner(k).name == "a"]
    assert to_b and to_c and stays
    cl.peers.down.add("b")  # b restarted and is not answering yet
    a = cl["a"]
    spy = JudgeSpy(a.store.judge)
    a.store.judge = spy  # type: ignore[method-assign]
    rb = Rebalancer("a", a.store, a.rings, cl.peers, resolve=a.handoff.fetch)
    try:
        rb.ring_changed()
        _poll(lambda: rb.pushed == len(to_c), "the copies for c pushed")
        _poll(lambda: rb.pending == len(to_b), "the copies for b counted as pending")

        dirty = [(0, stays[0])]  # a key held here, owned here: nothing to push
        rb.dirty(dirty)
        _poll(lambda: spy.saw(dirty), "the partial scan")
        assert rb.pending >= len(to_b)  # still missing at b, whatever the partial scan found

        cl.peers.down.discard("b")  # b answers again; no ring change follows
        _poll(
            lambda: all(get(cl["b"], k)[0].found for k in to_b),
            "every copy for b pushed by the retried full scan",
        )
        _poll(lambda: rb.pending == 0, "pending back to 0")
    finally:
        rb.close()
    for k in to_b:
        _, data = get(cl["b"], k)
        assert data == k.encode()


def _two_copies(cl: Cluster, *names: str) -> Ring:
    cl.epoch += 1
    return Ring(cl.epoch, [RingMember(n, n, 1) for n in names], weight_unit=1, replicas=2)


def test_pending_counts_hidden_copies_not_yet_decided():
    """A hidden copy of a key this node owns, whose co-replica is silent, is
    work left: ``pending`` says so until it is decided."""
    cl = Cluster("a", "b")
    cl.install(_two_copies(cl, "a", "b"))
    key = "h"
    put(cl["a"], key, b"v")
    cl["a"].rings.mark_gap()  # a was paused past its lease: what it holds is suspect
    cl.install(_two_copies(cl, "a", "b"))
    a = cl["a"]
    cl.peers.down.add("b")  # b cannot be asked: the hidden copy stays undecided
    rb = Rebalancer("a", a.store, a.rings, cl.peers, enabled=False, resolve=a.handoff.fetch)
    rb.scan_now()
    assert a.store.stats().demoted == 1
    assert rb.pending == 1
    cl.peers.down.discard("b")
    rb.scan_now()
    assert a.store.stats().demoted == 0 and rb.pending == 0
    got, data = get(a, key)
    assert got.found and data == b"v"
