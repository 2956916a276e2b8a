"""One fill per miss, cluster-wide: Client.get_or_load against real nodes.

The fill grant is a lease renewed while the loader runs (client/fill.py,
node/fill.py). Timings are printed (run with ``-s``) and asserted only
against generous bounds: this runs on small, shared CI machines.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import tensorcache
from tensorcache.wire import ring_from_snapshot

from .fillworker import VALUE, counting_loader, die_while_filling, load_gated, load_once
from .helpers import node_stat, poll

pytestmark = pytest.mark.integration

SLACK_S = 3.0  # scheduling slack on a loaded 2-core machine


def _fill_stats(c) -> tuple[int, int]:
    stats = c.stats()
    return sum(s.fills for s in stats), sum(s.fill_waits for s in stats)


def _loads(log: Path) -> list[str]:
    return log.read_text().split() if log.exists() else []


def test_a_loader_running_5_lease_periods_keeps_its_grant(cluster, prefix, tmp_path):
    """4 processes and 8 threads; the loader runs 10 s under a 2 s lease: once in all."""
    key = prefix + "weights"
    log, go = tmp_path / "loads.log", tmp_path / "go"
    lease, load_s = 2.0, 10.0
    ctx = multiprocessing.get_context("spawn")
    with tensorcache.connect(cluster.router_address) as c:
        fills0, waits0 = _fill_stats(c)
        with ctx.Pool(4) as procs, ThreadPoolExecutor(8) as threads:
            remote = [
                procs.apply_async(
                    load_once, (cluster.router_address, key, str(log), load_s, lease, str(go))
                )
                for _ in range(4)
            ]
            # All connected before anyone fills: their start-up is not the test's load.
            poll(
                lambda: len(list(tmp_path.glob("go.ready.*"))) == 4,
                timeout=60,
                what="4 worker processes to connect",
            )
            go.touch()
            loader = counting_loader(str(log), load_s)
            local = [
                threads.submit(c.get_or_load, key, loader, lease_s=lease, timeout_s=60)
                for _ in range(8)
            ]
            assert all(r.get(timeout=120) for r in remote)
            for f in local:
                np.testing.assert_array_equal(f.result(timeout=120), VALUE)
        assert len(_loads(log)) == 1  # the loader ran once in all
        fills, waits = _fill_stats(c)
        assert fills - fills0 == 1  # renewals are not new grants
        assert waits - waits0 > 0  # the others were told to wait, then read it


def test_a_filler_killed_mid_load_is_replaced_within_2_lease_periods(cluster, prefix, tmp_path):
    key = prefix + "weights"
    lease = 2.0
    started = tmp_path / "started"
    ctx = multiprocessing.get_context("spawn")
    filler = ctx.Process(
        target=die_while_filling, args=(cluster.router_address, key, str(started), lease)
    )
    filler.start()
    try:
        poll(started.exists, timeout=60, what="the filler to hold its grant over a lease period")
        loads: list[float] = []

        def load() -> np.ndarray:
            loads.append(time.monotonic())
            return VALUE

        with tensorcache.connect(cluster.router_address) as c, ThreadPoolExecutor(1) as ex:
            waiter = ex.submit(c.get_or_load, key, load, lease_s=lease, timeout_s=60)
            poll(lambda: c.metrics().get("fill_waits", 0) >= 2, timeout=30, what="a waiter")
            assert not loads  # the renewed grant holds the waiter off
            killed_at = time.monotonic()
            os.kill(filler.pid, signal.SIGKILL)
            np.testing.assert_array_equal(waiter.result(timeout=60), VALUE)
            assert c.metrics().get("fill_takeovers", 0) == 1
        assert len(loads) == 1
        takeover = loads[0] - killed_at
        print(f"\n[fill] takeover after kill -9 of the filler: {takeover:.2f} s (lease {lease} s)")
        assert takeover <= 2 * lease + SLACK_S
    finally:
        if filler.is_alive():
            filler.kill()
        filler.join(30)


def test_a_loader_that_raises_hands_the_grant_over_at_once(cluster, prefix):
    key = prefix + "k"
    long_lease = 10.0  # the failing filler's: a handover that waited for it would show
    started, go = threading.Event(), threading.Event()
    loads: list[float] = []

    def broken() -> np.ndarray:
        started.set()
        go.wait(60)
        raise RuntimeError("storage is down")

    def load() -> np.ndarray:
        loads.append(time.monotonic())
        return np.ones(3)

    with (
        tensorcache.connect(cluster.router_address) as a,
        tensorcache.connect(cluster.router_address) as b,
        ThreadPoolExecutor(2) as ex,
    ):
        filling = ex.submit(a.get_or_load, key, broken, lease_s=long_lease)
        assert started.wait(30)
        # A waiter that gives up is told which key and who is filling it.
        with pytest.raises(tensorcache.Unavailable) as info:
            b.get_or_load(key, load, timeout_s=1.0)
        msg = str(info.value)
        assert repr(key) in msg and f"{socket.gethostname()} pid {os.getpid()}" in msg
        waiting = ex.submit(b.get_or_load, key, load, timeout_s=60)
        poll(lambda: b.metrics().get("fill_waits", 0) >= 3, timeout=30, what="a waiter")
        raised_at = time.monotonic()
        go.set()
        with pytest.raises(RuntimeError, match="storage is down"):
            filling.result(timeout=60)
        np.testing.assert_array_equal(waiting.result(timeout=60), np.ones(3))
    assert len(loads) == 1
    handover = loads[0] - raised_at
    print(f"\n[fill] handover after the loader raised: {handover:.2f} s")
    assert handover < long_lease / 2  # released at once, not left to lapse


def test_a_failing_or_refused_fill_releases_its_own_grant(cluster, prefix):
    key = prefix + "k"

    def broken() -> np.ndarray:
        raise RuntimeError("storage is down")

    with tensorcache.connect(cluster.router_address) as c:
        with pytest.raises(RuntimeError, match="storage is down"):
            c.get_or_load(key, broken)
        with pytest.raises(tensorcache.InvalidArgument):
            c.get_or_load(key, lambda: [1, 2, 3])  # not an array: refused, grant released
        with pytest.raises(tensorcache.InvalidArgument, match="lease_s"):
            c.get_or_load(key, lambda: np.ones(3), fill_ttl_s=60)  # the old fixed grant
        got = c.get_or_load(key, lambda: np.ones(3))
        np.testing.assert_array_equal(got, np.ones(3))
        assert c.metrics().get("fill_waits", 0) == 0  # never waited on its own dead grants


LONG_LEASE_S = 6.0


def test_the_grants_owner_killed_mid_fill_at_r2_one_more_fill_at_most(make_cluster, tmp_path):
    cluster = make_cluster(3, replicas=2)
    key = "owner-killed/weights"
    owner = ring_from_snapshot(cluster.ring()).owner(key).name
    log, started, go = tmp_path / "loads.log", tmp_path / "started", tmp_path / "go"
    ctx = multiprocessing.get_context("spawn")
    clients = [tensorcache.connect(cluster.router_address) for _ in range(3)]
    try:
        with ctx.Pool(1) as procs, ThreadPoolExecutor(3) as threads:
            # A lease longer than any scheduling stall of a loaded CI box: what
            # this test is about is the owner failing over, not a lapse.
            filler = procs.apply_async(
                load_gated,
                (cluster.router_address, key, str(log), str(started), str(go), LONG_LEASE_S),
            )
            poll(started.exists, timeout=60, what="the filler to take the grant")
            waiters = [
                threads.submit(
                    c.get_or_load, key, lambda: VALUE, lease_s=LONG_LEASE_S, timeout_s=120
                )
                for c in clients
            ]
            for c in clients:
                poll(lambda c=c: c.metrics().get("fill_waits", 0) >= 1, timeout=30, what="waiters")
            killed_at = time.monotonic()
            cluster.stop_node(owner, kill=True)
            snap = cluster.wait_members(set(cluster.nodes), timeout=60)
            new_owner = ring_from_snapshot(snap).owner(key)
            # Someone (the filler renewing, or a waiter) now holds a grant at the new owner.
            poll(
                lambda: node_stat(new_owner.address).fills >= 1,
                timeout=60,
                what="a grant at the key's new owner",
            )
            go.touch()  # the loads finish
            assert filler.get(timeout=120)
            for w in waiters:
                np.testing.assert_array_equal(w.result(timeout=120), VALUE)
            done_s = time.monotonic() - killed_at
    finally:
        for c in clients:
            c.close()
    # The gated loader logs one line per process that ran it; a waiter thread
    # that took over runs `lambda: VALUE` and is counted by its client.
    fills = len(_loads(log)) + sum(c.metrics().get("loads", 0) for c in clients)
    print(f"\n[fill] owner killed at R=2: {fills} fill(s); everyone done {done_s:.1f} s after")
    assert 1 <= fills <= 2
