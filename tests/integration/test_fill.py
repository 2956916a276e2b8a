"""One fill per miss, cluster-wide: Client.get_or_load against real nodes."""

from __future__ import annotations

import multiprocessing
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import tensorcache

from .fillworker import VALUE, counting_loader, die_while_filling, load_once
from .helpers import poll

pytestmark = pytest.mark.integration


def _fill_stats(c) -> tuple[int, int]:
    stats = c.stats()
    return sum(s.fills for s in stats), sum(s.fill_waits for s in stats)


def test_many_threads_and_processes_load_once(cluster, prefix, tmp_path):
    key = prefix + "weights"
    log = str(tmp_path / "loads.log")
    ctx = multiprocessing.get_context("spawn")
    with tensorcache.connect(cluster.router_address) as c:
        fills0, waits0 = _fill_stats(c)
        with ctx.Pool(4) as procs, ThreadPoolExecutor(8) as threads:
            remote = [
                procs.apply_async(load_once, (cluster.router_address, key, log, 1.0))
                for _ in range(4)
            ]
            local = [
                threads.submit(c.get_or_load, key, counting_loader(log, 1.0), timeout_s=60)
                for _ in range(8)
            ]
            assert all(r.get(timeout=120) for r in remote)
            for f in local:
                np.testing.assert_array_equal(f.result(timeout=120), VALUE)
        assert len(Path(log).read_text().split()) == 1  # the loader ran once in all
        fills, waits = _fill_stats(c)
        assert fills - fills0 == 1
        assert waits - waits0 > 0  # the others were told to wait, then read it


def test_a_dead_filler_is_replaced(cluster, prefix, tmp_path):
    key = prefix + "weights"
    started = tmp_path / "started"
    ctx = multiprocessing.get_context("spawn")
    filler = ctx.Process(target=die_while_filling, args=(cluster.router_address, key, str(started)))
    filler.start()
    try:
        poll(started.exists, timeout=60, what="the first filler to take the grant")
        os.kill(filler.pid, signal.SIGKILL)
        filler.join(30)
        calls = []

        def load() -> np.ndarray:
            calls.append(1)
            return VALUE

        with tensorcache.connect(cluster.router_address) as c:
            got = c.get_or_load(key, load, timeout_s=60)  # granted once the dead one's expires
        np.testing.assert_array_equal(got, VALUE)
        assert calls == [1]
    finally:
        if filler.is_alive():
            filler.kill()


def test_a_failing_loader_gives_the_grant_back(cluster, prefix):
    key = prefix + "k"

    def broken() -> np.ndarray:
        raise RuntimeError("storage is down")

    with tensorcache.connect(cluster.router_address) as c:
        with pytest.raises(RuntimeError, match="storage is down"):
            c.get_or_load(key, broken)
        with pytest.raises(tensorcache.InvalidArgument):
            c.get_or_load(key, lambda: [1, 2, 3])  # not an array: refused, grant released
        got = c.get_or_load(key, lambda: np.ones(3))
        np.testing.assert_array_equal(got, np.ones(3))
        assert c.metrics().get("fill_waits", 0) == 0  # never waited on its own dead grants
