"""The co-located fast path (process_vm_readv) against real node processes."""

from __future__ import annotations

import numpy as np
import pytest

import tensorcache
from tensorcache import localread

from .helpers import poll

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not localread.AVAILABLE, reason="needs Linux process_vm_readv"),
]

MIB = 1024 * 1024


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_local_reads_are_used_and_exact(cluster, prefix):
    value = (np.arange(40 * MIB // 4, dtype=np.float32) % 997).reshape(-1, 1024)  # striped
    small = np.arange(1000, dtype=np.int16)  # below the local threshold: payload
    with tensorcache.connect(cluster.router_address) as c:
        c.put_many({prefix + "big": value, prefix + "small": small})
        got = c.get_many([prefix + "big", prefix + "small"])
        np.testing.assert_array_equal(got[prefix + "big"], value)
        np.testing.assert_array_equal(got[prefix + "small"], small)
        assert c.metrics().get("local_reads", 0) > 0
    with tensorcache.connect(cluster.router_address, local_fastpath=False) as c:
        np.testing.assert_array_equal(c.get(prefix + "big"), value)
        assert c.metrics().get("local_reads", 0) == 0


def test_get_into_out_reuses_the_callers_array(cluster, prefix):
    value = np.asfortranarray(np.random.default_rng(3).random((600, 700)))
    with tensorcache.connect(cluster.router_address) as c:
        c.put(prefix + "k", value)
        out = np.zeros_like(value, order="F")
        assert c.get(prefix + "k", out=out) is out
        np.testing.assert_array_equal(out, value)
        with pytest.raises(tensorcache.InvalidArgument, match="out"):
            c.get(prefix + "k", out=np.zeros((600, 699)))


def test_replacing_an_entry_never_changes_what_a_reader_got(cluster, prefix):
    a = np.full(4 * MIB, 1, np.uint8)
    b = np.full(4 * MIB, 2, np.uint8)
    with tensorcache.connect(cluster.router_address) as c:
        for i in range(20):  # bounded
            c.put(prefix + "k", a if i % 2 == 0 else b)
            got = c.get(prefix + "k")
            want = a if i % 2 == 0 else b
            np.testing.assert_array_equal(got, want)


def test_memory_of_a_deleted_entry_is_not_held_by_an_idle_reader(make_cluster, prefix):
    """After a local get the node unpins at once, not at the client's next request.

    Read from the node's RSS, so the node keeps no receive pool here
    (``--recv-pool 0``): with one, freed memory stays for the next put."""
    cluster = make_cluster(3, capacity="1GiB", node_args=["--recv-pool", "0"])
    value = np.ones(256 * MIB, np.uint8)
    with tensorcache.connect(cluster.router_address, stripe_size="512MiB") as c:
        c.put(prefix + "k", value)
        owner = next(s for s in c.stats() if s.keys and s.bytes_used >= 256 * MIB)
        pid = next(p.pid for p in cluster.nodes.values() if p.address == owner.address)
        assert c.get(prefix + "k") is not None
        assert c.metrics().get("local_reads", 0) > 0
        held = _rss_mib(pid)
        assert c.delete(prefix + "k")
        # The client stays connected and idle; the node must give the memory back.
        poll(
            lambda: _rss_mib(pid) < held - 200 or None,
            what=f"node RSS to drop below {held - 200:.0f} MiB after the delete",
        )
