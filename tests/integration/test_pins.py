"""Pinning against real node processes (node/pins.py states the rules).

- pinned puts survive eviction pressure many times the budget;
- a pin beyond a node's ``--pinned-capacity`` is refused with
  CapacityExceeded naming the quota, and the cluster is left intact;
- ``tensorcache stat`` and ``Client.stats()`` show pinned bytes;
- a namespace pin (``Client.pin(prefix)``) protects what is stored;
- a pinned entry drained to another node (SIGTERM) stays pinned there.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import tensorcache

from .helpers import assert_same, total

pytestmark = pytest.mark.integration

MIB = 1024 * 1024


def value_for(i: int, nbytes: int) -> np.ndarray:
    return ((np.arange(nbytes, dtype=np.uint32) * 7 + i) % 251).astype(np.uint8)


def test_pins_against_eviction_quota_stat_and_drain(make_cluster, prefix):
    cl = make_cluster(3, capacity="24MiB", pinned_capacity="8MiB")
    pinned = {f"{prefix}w/{i}": value_for(i, MIB) for i in range(6)}
    with tensorcache.connect(cl.router_address) as c:
        c.put_many(pinned, pin=True)
        for i in range(4):
            c.put(f"{prefix}ns/{i}", value_for(100 + i, MIB // 2))
        assert c.pin(f"{prefix}ns/").entries == 4
        stats = c.stats()
        assert {s.pinned_capacity for s in stats} == {8 * MIB}
        assert total(stats, "pinned") == 10
        assert total(stats, "pinned_bytes") > 8 * MIB

        # 150 MiB of unpinned puts through 72 MiB of budget: pins stay.
        for i in range(150):
            c.put(f"{prefix}churn/{i}", value_for(i, MIB))
        stats = c.stats()
        assert total(stats, "evictions") > 0
        for k, v in pinned.items():
            assert_same(c.get(k), v)
        for i in range(4):
            assert_same(c.get(f"{prefix}ns/{i}"), value_for(100 + i, MIB // 2))

        # Beyond the quota: refused, named, nothing changed.
        before = total(c.stats(), "pinned_bytes")
        with pytest.raises(tensorcache.CapacityExceeded, match="pinned quota"):
            c.put(f"{prefix}too-big", value_for(0, 8 * MIB), pin=True)
        assert c.get(f"{prefix}too-big") is None
        assert total(c.stats(), "pinned_bytes") == before

        out = subprocess.run(
            [sys.executable, "-m", "tensorcache", "stat", "--router", cl.router_address],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        assert "pinned" in out and "/8.0 MiB" in out, out  # used/quota per node

        # A node leaves gracefully: its pinned entries are pinned at their new owners.
        victim = next(s.name for s in c.stats() if s.pinned)
        assert cl.stop_node(victim) == 0
        stats = c.stats()
        assert total(stats, "pins_dropped") == 0
        assert total(stats, "pinned") == 10
        for i in range(150, 300):
            c.put(f"{prefix}churn/{i}", value_for(i, MIB))
        for k, v in pinned.items():
            assert_same(c.get(k), v)

        assert c.unpin(prefix).entries == 10
        assert total(c.stats(), "pinned_bytes") == 0
