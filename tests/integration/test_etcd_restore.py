"""Backing up etcd and restoring it (docs/operations.md, "Backing up etcd").

Real processes throughout: a private etcd (tensorcache/apps/etcdserver.py),
``tensorcache router --etcd`` and two ``tensorcache node`` processes on
loopback; the backup is ``etcdctl snapshot save`` and the restore
``etcdctl snapshot restore`` into a fresh data directory, with a new etcd
(new ports) started on it. The router comes back on its old address with
the new etcd URL; the nodes, never restarted, find it on their own.
Waits poll with a deadline; nothing sleeps a fixed time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import tensorcache
from tensorcache.apps.etcdserver import EtcdServer, find_etcdctl, free_port

from .etcdprocs import Procs, names, ring, table
from .helpers import poll

pytestmark = pytest.mark.integration

NODES = {"n0", "n1"}


@pytest.fixture(scope="session")
def etcdctl() -> str:
    """etcdctl (Debian: etcd-client). Missing: skip, except under CI, where it must run."""
    binary = find_etcdctl()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("CI is set but etcdctl was not found: .ci/run installs etcd-client")
        pytest.skip("no etcdctl (apt-get install etcd-client): the backup/restore tests need it")
    return binary


@pytest.fixture
def etcd(etcd_binary: str, etcdctl: str) -> Iterator[EtcdServer]:
    with EtcdServer(etcd_binary, etcdctl=etcdctl) as server:
        yield server


def test_restored_etcd_keeps_invalidations_and_nodes_rejoin(
    procs: Procs, etcd: EtcdServer, etcd_binary: str, etcdctl: str, tmp_path: Path
) -> None:
    port = free_port()  # fixed: the nodes find the router again at the same address
    router_proc, router = procs.router("router", port)
    for name in sorted(NODES):
        procs.node(name, router)
    poll(lambda: names(ring(router)) == NODES, timeout=20, what="the router to list both nodes")

    old = np.arange(4096, dtype=np.float32)
    other = np.full(512, 7, dtype=np.int64)
    with tensorcache.connect(router) as c:
        c.put("models/v1/w", old)
        c.put("other/x", other)
        gen = c.invalidate("models/")
        assert c.get("models/v1/w") is None
        seen = max(c.epoch, *(s.epoch for s in c.stats()))
    backup = etcd.save_snapshot(tmp_path / "backup.db")

    # The control plane is lost: the router, etcd and etcd's data directory.
    router_proc.send_signal(signal.SIGTERM)
    assert router_proc.wait(15) == 0
    etcd.stop()

    with EtcdServer(etcd_binary, snapshot=backup, etcdctl=etcdctl) as restored:
        procs.etcd_url = restored.url
        _, again = procs.router("router-restored", port)
        assert again == router
        snap = poll(
            lambda: (s := ring(router)) and names(s) == NODES and s.epoch > seen and s,
            timeout=20,
            what="the restored router to list both nodes at a newer epoch",
        )
        # The invalidation came back with etcd, at the epoch it was made.
        assert table(snap) == {"models/": gen}

        with tensorcache.connect(router) as c:
            # Both nodes adopted the restored router's ring (and so its table).
            poll(
                lambda: all(s.reachable and s.epoch >= snap.epoch for s in c.stats()),
                timeout=10,
                what="both nodes to adopt the restored ring",
            )
            assert c.get("models/v1/w") is None  # put before the invalidation: still hidden
            np.testing.assert_array_equal(c.get("other/x"), other)  # the nodes kept their data
            newer = old + 1
            c.put("models/v1/w", newer)
            np.testing.assert_array_equal(c.get("models/v1/w"), newer)
            # Epochs go on above every one seen before the loss, so a new
            # invalidation hides what was put before it, on every node.
            gen2 = c.invalidate("other/")
            assert gen2 > seen
            assert c.get("other/x") is None
            np.testing.assert_array_equal(c.get("models/v1/w"), newer)
        procs.stop()  # while the restored etcd is up: the nodes deregister cleanly


def test_restore_of_an_older_snapshot_needs_the_epoch_moved_past_the_nodes(
    procs: Procs, etcd: EtcdServer, etcd_binary: str, etcdctl: str, tmp_path: Path
) -> None:
    """Changes after the snapshot: etcd's revision comes back *below* the nodes' epoch.

    Without ``tensorcache etcd-restored`` the restored router's epochs are
    older than the nodes': they adopt none of its rings, and refuse
    requests placed with them (router/etcd_restore.py). With it, the epoch
    moves past them; the nodes adopt the restored ring, serve again, and an
    invalidation made after the restore hides values the nodes stamped at
    the high epochs of before it.
    """
    port = free_port()
    router_proc, router = procs.router("router", port)
    for name in sorted(NODES):
        procs.node(name, router)
    poll(lambda: names(ring(router)) == NODES, timeout=20, what="the router to list both nodes")
    late = np.arange(300, dtype=np.float64)
    with tensorcache.connect(router) as c:
        gen = c.invalidate("models/")
        backup = etcd.save_snapshot(tmp_path / "backup.db")
        for i in range(5):  # ring changes the backup does not hold
            c.invalidate(f"after-backup-{i}/")
        c.put("late/x", late)  # stamped at an epoch above the backup's revision
        seen = max(c.epoch, *(s.epoch for s in c.stats()))

    router_proc.send_signal(signal.SIGTERM)
    assert router_proc.wait(15) == 0
    etcd.stop()

    with EtcdServer(etcd_binary, snapshot=backup, etcdctl=etcdctl) as restored:
        procs.etcd_url = restored.url
        procs.router("router-restored", port)
        behind = poll(
            lambda: (s := ring(router)) and names(s) == NODES and s,
            timeout=20,
            what="the restored router to list both nodes",
        )
        # The restore brought back the backup's revision: below the nodes' epoch.
        assert behind.epoch < seen
        # Invalidations made after the backup are gone with it (the doc says
        # to re-issue them); the one before it is there.
        assert table(behind) == {"models/": gen}

        out = subprocess.run(
            [sys.executable, "-m", "tensorcache", "etcd-restored", "--etcd", restored.url,
             "--router", router],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        snap = poll(
            lambda: (s := ring(router)) and s.epoch > seen and names(s) == NODES and s,
            timeout=10,
            what="the router to publish an epoch past the nodes'",
        )
        assert snap.epoch >= seen + 1000  # the default margin
        assert table(snap) == {"models/": gen}

        with tensorcache.connect(router) as c:
            poll(
                lambda: all(s.reachable and s.epoch >= snap.epoch for s in c.stats()),
                timeout=10,
                what="both nodes to adopt the advanced ring",
            )
            np.testing.assert_array_equal(c.get("late/x"), late)  # served again
            gen2 = c.invalidate("late/")
            assert gen2 > seen
            assert c.get("late/x") is None  # the stamp from before the restore is older
            c.put("late/x", late * 2)
            np.testing.assert_array_equal(c.get("late/x"), late * 2)
        procs.stop()


def test_advance_refuses_more_writes_than_allowed_and_needs_an_epoch(etcd: EtcdServer) -> None:
    from tensorcache.router.etcd_restore import advance

    with pytest.raises(ValueError, match="max_writes=10"):
        advance(etcd.url, 10**9, max_writes=10)
    done = advance(etcd.url, 50)
    assert done.epoch > 50 and done.writes <= 50
    out = subprocess.run(
        [sys.executable, "-m", "tensorcache", "etcd-restored", "--etcd", etcd.url],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 2
    assert "no epoch to move past" in out.stderr
