"""The disk tier in real node processes: spill, serve, and the cluster's rules.

Nodes run with a small RAM budget and ``--disk-path`` under the test's tmp
dir, so most of what is put spills to disk; the stats (``disk_*``) show
that it did and that reads were served from there. Then the rules that hold
for RAM are checked against entries on disk: an overwrite, a delete or an
invalidation leaves nothing older readable; a join moves spilled entries to
their new owner (demotion, pushes and handoff read from disk); and a node
killed with SIGKILL and started again under its name comes back with its
files, but serves none that the cluster wrote over, deleted or invalidated
while it was down (docs/consistency.md, "Warm restart").
"""

from __future__ import annotations

import numpy as np
import pytest

import tensorcache

from .helpers import poll, settled, total

pytestmark = pytest.mark.integration

VALUE = 64 * 1024  # float32 elements: 256 KiB per tensor
# 8 MiB of RAM of which 4 MiB hold evicted bytes on their way to disk: about
# 15 tensors stay in RAM, everything beyond spills.
NODE = {"capacity": "8MiB", "node_args": ["--disk-queue", "4MiB"], "etcd": "none"}


def value(key: str, gen: int = 0) -> np.ndarray:
    seed = int.from_bytes(key.encode()[-8:].rjust(8, b"\0"), "little") + 1000 * gen
    return np.random.default_rng(seed).standard_normal(VALUE, dtype=np.float32)


def same(got: np.ndarray | None, want: np.ndarray) -> bool:
    return got is not None and got.dtype == want.dtype and got.tobytes() == want.tobytes()


def disk(c: tensorcache.Client) -> dict[str, int]:
    stats = c.stats()
    fields = ("disk_hits", "disk_spills", "disk_files", "disk_write_drops", "evictions")
    return {f: total(stats, f) for f in fields}


def fill(c: tensorcache.Client, prefix: str, n: int) -> list[str]:
    keys = [f"{prefix}fill-{i}" for i in range(n)]
    for k in keys:
        c.put(k, value(k))
    return keys


def test_entries_beyond_ram_are_served_from_disk_exactly(make_cluster, tmp_path, prefix):
    cl = make_cluster(1, disk_path=tmp_path / "disk", disk_capacity="256MiB", **NODE)
    with tensorcache.connect(cl.router_address) as c:
        keys = fill(c, prefix, 48)  # 12 MiB into 4 MiB of RAM
        poll(lambda: disk(c)["disk_files"] >= 20, what="spilled entries on disk", timeout=30)
        lost = 0
        for k in keys:
            got = c.get(k)
            if got is None:
                lost += 1
            else:
                assert same(got, value(k))
        d = disk(c)
        assert d["disk_hits"] >= 20  # read back from files, not recomputed
        # Nothing is lost but what a full write queue dropped, and that is counted.
        assert lost == d["evictions"] == d["disk_write_drops"]
        stats = settled(c)
        assert all(s.bytes_used <= s.capacity for s in stats)
        assert sum(len(list(p.rglob("*.tce"))) for p in [tmp_path / "disk"]) == d["disk_files"]


def test_striped_tensors_spill_with_their_manifests(make_cluster, tmp_path, prefix):
    """Stripes and the manifest that lists them both go to disk and come back."""
    cl = make_cluster(1, disk_path=tmp_path / "disk", disk_capacity="256MiB", **NODE)
    with tensorcache.connect(cl.router_address, stripe_size="64KiB") as c:
        keys = fill(c, prefix, 40)  # 4 stripes + a manifest each
        poll(lambda: disk(c)["disk_files"] >= 60, what="spilled stripes on disk", timeout=30)
        got = {k: c.get(k) for k in keys}
        d = disk(c)
        assert all(same(v, value(k)) for k, v in got.items() if v is not None)
        # Only what a full write queue dropped may be missing (24 were, before
        # manifests spilled: they were dropped while their stripes went to disk).
        assert sum(v is None for v in got.values()) <= d["disk_write_drops"]
        assert d["disk_hits"] > 40  # stripes and manifests read back from files


def test_no_stale_read_from_disk_after_overwrite_delete_or_invalidate(
    make_cluster, tmp_path, prefix
):
    cl = make_cluster(1, disk_path=tmp_path / "disk", disk_capacity="256MiB", **NODE)
    with tensorcache.connect(cl.router_address) as c:
        over, gone, ns = f"{prefix}over", f"{prefix}gone", f"{prefix}ns/x"
        for k in (over, gone, ns):
            c.put(k, value(k))
        fill(c, prefix, 40)  # the three are the oldest: spilled first
        before = disk(c)["disk_hits"]
        assert same(c.get(over), value(over))
        assert disk(c)["disk_hits"] == before + 1  # it really was on disk
        fill(c, prefix + "2/", 24)  # and back there (its file is still valid)

        c.put(over, value(over, gen=1))  # overwrite: the file of gen 0 must not come back
        assert c.delete(gone)
        c.invalidate(f"{prefix}ns/")
        fill(c, prefix + "3/", 24)  # gen 1 of `over` goes to disk now
        for _ in range(2):  # once from wherever it is, once more after a promotion
            assert same(c.get(over), value(over, gen=1))
            assert c.get(gone) is None
            assert c.get(ns) is None
        versions = {c.version(over)}
        assert len(versions) == 1 and versions != {0}


def test_spilled_entries_move_to_a_joining_owner(make_cluster, tmp_path, prefix):
    cl = make_cluster(1, disk_path=tmp_path / "disk", disk_capacity="256MiB", **NODE)
    with tensorcache.connect(cl.router_address) as c:
        keys = fill(c, prefix, 40)
        poll(lambda: disk(c)["disk_files"] >= 15, what="spilled entries on disk", timeout=30)
        lost = disk(c)["disk_write_drops"]
        cl.add_node()  # about half of the keys now belong to the new node

        # Let the pushes finish first: a node this small has no room for a
        # handoff while a 16 MiB push batch holds its reservation.
        def pushed() -> bool:
            stats = c.stats()
            old = next(s for s in stats if s.name == "node-0")
            return old.rereplicated > 0 and all(
                s.pending == 0 and s.bytes_reserved == 0 for s in stats
            )

        poll(pushed, what="the rebalance to finish", timeout=60)
        got = {k: c.get(k) for k in keys}
        missing = [k for k, v in got.items() if v is None]
        assert len(missing) <= lost
        assert all(same(v, value(k)) for k, v in got.items() if v is not None)
        stats = {s.name: s for s in c.stats()}
        # The old node pushed spilled entries to the new owner, read from disk.
        assert stats["node-1"].keys > 0 and stats["node-0"].rereplicated > 0


def test_a_warm_restart_serves_nothing_the_cluster_replaced(make_cluster, tmp_path, prefix):
    """kill -9; writes, a delete and an invalidation while it is down; restart."""
    cl = make_cluster(2, disk_path=tmp_path / "disk", disk_capacity="256MiB", ttl=2.0, **NODE)
    with tensorcache.connect(cl.router_address) as c:
        keys = [f"{prefix}k{i}" for i in range(72)] + [f"{prefix}ns/k{i}" for i in range(8)]
        for k in keys:
            c.put(k, value(k))
        stats = {s.name: s for s in c.stats()}
        poll(
            lambda: {s.name: s.disk_files for s in c.stats()}["node-0"] >= 6,
            what="node-0 to spill entries",
            timeout=30,
        )
        cl.stop_node("node-0", kill=True)
        cl.wait_members({"node-1"}, timeout=30)  # its lease ran out: the ring moved on

        rewritten = keys[:12]
        deleted = keys[12:18]
        for k in rewritten:
            c.put(k, value(k, gen=1))
        for k in deleted:
            c.put(k, value(k, gen=2))  # lands on node-1 ...
            assert c.delete(k)  # ... and is deleted there
        c.invalidate(f"{prefix}ns/")

        cl.start_node("node-0")
        cl.wait_members({"node-0", "node-1"}, timeout=30)
        stats = {s.name: s for s in c.stats()}
        assert stats["node-0"].disk_loaded >= 6  # it came back with its files

        kept = 0
        for k in keys:
            got = c.get(k)
            if k in rewritten:
                assert same(got, value(k, gen=1)), k
            elif k in deleted or "/ns/" in k:
                assert got is None, k
            elif got is not None:  # untouched: the old value, exactly, or nothing
                assert same(got, value(k)), k
                kept += 1
        stats = {s.name: s for s in c.stats()}
        # Untouched keys of node-0 came back from its disk (not re-put by anyone).
        assert stats["node-0"].revived > 0 and kept > 0
