"""A tensor past 2 GiB: offsets beyond 32 bits, a ragged last stripe, bounded memory."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

import tensorcache
from tensorcache.apps.cluster import LocalCluster

from .helpers import total

pytestmark = [pytest.mark.integration, pytest.mark.slow]

GIB = 1024**3
N = 2**31 + 4096  # bytes: 256 stripes of 8 MiB and a last one of 4 KiB
BLOCK = 64 * 1024 * 1024


def periodic(n: int, period: int = 251) -> np.ndarray:
    """0, 1, ..., period-1, 0, 1, ... as uint8, filled by doubling copies.

    A prime period: any stripe (a multiple of 8 MiB) moved to another offset
    shows up as different bytes.
    """
    a = np.empty(n, dtype=np.uint8)
    a[:period] = np.arange(period, dtype=np.uint8)
    filled = period
    while filled < n:
        m = min(filled, n - filled)
        a[filled : filled + m] = a[:m]
        filled += m
    return a


def peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


@pytest.fixture(scope="module")
def big_cluster(tmp_path_factory) -> Iterator[LocalCluster]:
    c = LocalCluster(3, capacity="2GiB", log_dir=tmp_path_factory.mktemp("big")).start()
    yield c
    c.stop()


def test_two_gib_round_trip(big_cluster):
    key = "two-gib"
    value = periodic(N)
    with tensorcache.connect(big_cluster.router_address) as c:  # cluster stripe size, 8 MiB
        c.put(key, value)
        stats = c.stats()
        assert total(stats, "keys") == 1
        assert total(stats, "shards") == 257
        assert sum(s.shards > 0 for s in stats) >= 2
        assert all(s.bytes_used <= s.capacity for s in stats)

        got = c.get(key)
        assert got is not None
        assert got.dtype == np.uint8 and got.shape == (N,)
        assert got[-1] == value[-1] and got[2**31] == value[2**31]
        for off in range(0, N, BLOCK):  # blockwise: no 2 GiB boolean temporary
            assert np.array_equal(got[off : off + BLOCK], value[off : off + BLOCK]), off
        del got

        assert c.delete(key) is True
        after = c.stats()
        assert total(after, "shards") == 0
        assert total(after, "bytes_used") == 0
        assert c.get(key) is None

    # Payload bytes are never copied into protobuf messages: the nodes peak
    # far below the ~3x a bytes-field encoding would cost.
    node_peak = sum(peak_rss(p.pid) for p in big_cluster.nodes.values())
    assert node_peak < 2 * N, f"nodes peaked at {node_peak / GIB:.1f} GiB for 2 GiB stored"
