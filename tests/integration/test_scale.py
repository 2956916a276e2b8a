"""Many entries per node: ring changes stay O(changed) and off the data path (#17).

With 200k entries on a node, an invalidation and a join each move the ring
by exactly one epoch (no node flaps out of the ring because a scan starved
its heartbeats), fail no get, and every moved entry reaches its new owner.
The byte budget charges what an entry really costs the node process, for
tiny entries and for large ones.
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

import tensorcache
from tensorcache.errors import TensorCacheError

from .helpers import poll

pytestmark = pytest.mark.integration

N = 200_000
BATCH = 5000


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def fill(c, prefix: str, n: int) -> None:  # type: ignore[no-untyped-def]
    for start in range(0, n, BATCH):
        c.put_many(
            {f"{prefix}{i}": np.array([i], dtype=np.int64) for i in range(start, start + BATCH)}
        )


class Reader:
    """Single gets of known keys on a thread, until stopped (bounded)."""

    def __init__(self, router: str, prefix: str) -> None:
        self.router, self.prefix = router, prefix
        self.gets = 0
        self.failed: list[str] = []
        self.wrong = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        rng = np.random.default_rng(17)
        deadline = time.monotonic() + 240
        with tensorcache.connect(self.router) as c:
            while not self._stop.is_set() and time.monotonic() < deadline and self.gets < 200_000:
                i = int(rng.integers(0, N))
                try:
                    got = c.get(f"{self.prefix}{i}")
                    if got is None or int(got[0]) != i:
                        self.wrong += 1
                except TensorCacheError as exc:
                    self.failed.append(f"{type(exc).__name__}: {exc}")
                self.gets += 1

    def __enter__(self) -> Reader:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)


def test_invalidation_and_a_join_at_200k_entries_keep_the_ring_stable(make_cluster, prefix):
    cl = make_cluster(1, capacity="2GiB", etcd="none")
    epochs: list[int] = []
    with tensorcache.connect(cl.router_address) as c:
        fill(c, prefix, N)
        e0 = cl.ring().epoch
        with Reader(cl.router_address, prefix) as reader:
            start = time.monotonic()
            generation = c.invalidate("unrelated/")  # matches nothing: O(1) anyway
            took = time.monotonic() - start
            print(f"invalidate at {N} entries: {took * 1000:.1f} ms")
            e1 = cl.ring().epoch
            assert e1 > e0 and generation > e0
            new = cl.add_node()
            e2 = cl.ring().epoch

            def settled() -> bool:
                epochs.append(cl.ring().epoch)
                stats = c.stats()
                return len(stats) == 2 and all(
                    s.epoch == epochs[-1] and s.pending == 0 and s.demoted == 0 for s in stats
                )

            poll(settled, timeout=120, interval=0.1, what="every moved entry at its new owner")
            # A few more heartbeat periods: a node that flapped would show here.
            for _ in range(20):
                epochs.append(cl.ring().epoch)
                time.sleep(0.1)
            moved = next(s for s in c.stats() if s.name == new.name).keys
        assert set(epochs) <= {e1, e2}, f"extra epochs: {sorted(set(epochs) - {e1, e2})}"
        assert reader.gets > 0 and not reader.failed and reader.wrong == 0, (
            reader.failed[:5],
            reader.wrong,
        )
        assert 0 < moved < N
        keys = [f"{prefix}{i}" for i in range(N)]
        got = c.get_many(keys)
        lost = [k for k in keys if got[k] is None]
        assert not lost, (len(lost), lost[:10], c.stats())
        stats = c.stats()
        assert sum(s.keys for s in stats) == N
        assert sum(s.evictions for s in stats) == 0


@pytest.mark.parametrize(
    ("n", "size"), [(N, 1), (1, 256 * 1024 * 1024 // 8)], ids=["200k-x-8B", "1-x-256MiB"]
)
def test_the_budget_charges_what_an_entry_costs_the_node(make_cluster, prefix, n, size):
    cl = make_cluster(1, capacity="2GiB", etcd="none")
    pid = next(iter(cl.nodes.values())).pid
    with tensorcache.connect(cl.router_address) as c:
        c.put_many({f"{prefix}warm{i}": np.arange(1, dtype=np.int64) for i in range(1000)})
        used0, rss0 = c.stats()[0].bytes_used, rss(pid)
        if n == 1:
            c.put(f"{prefix}big", np.ones(size, dtype=np.int64))
        else:
            fill(c, prefix, n)
        used, grown = c.stats()[0].bytes_used - used0, rss(pid) - rss0
    print(f"{n} x {size * 8} B: RSS +{grown / n:.0f} B/entry, charged {used / n:.0f} B/entry")
    # The node's RSS stays within what the budget charged, plus 10 % and a
    # little allocator slack: capacity x 1.1 + 100 MiB holds at any fill.
    assert grown <= used * 1.1 + 16 * 1024 * 1024, (grown, used)
    assert os.path.exists(f"/proc/{pid}")
