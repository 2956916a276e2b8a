"""Threads of one client and separate processes race on a few shared keys.

The threads share one default client (co-located reads, data channel); the
processes use the co-located path, the data channel and the gRPC streams, so
every bulk path races against every other on the same keys.

Every answer must be a miss or exactly a value that was put under that key
(see workload.py for how each value proves where it came from).
"""

from __future__ import annotations

import math
import multiprocessing
import sys
import threading
import time

import pytest

import tensorcache

from . import workload
from .helpers import TRANSPORTS, settled, total

pytestmark = pytest.mark.integration

THREADS = 8
PROCESSES = 4
OPS = 200
TIME_LIMIT_S = 150.0  # a bound on the run, not an assertion
PATHS = [TRANSPORTS[name] for name in ("local", "data", "grpc", "local")]


def test_threads_and_processes_never_see_a_wrong_value(cluster, prefix):
    router = cluster.router_address
    deadline = time.time() + TIME_LIMIT_S
    with tensorcache.connect(router, stripe_size=workload.STRIPE_SIZE) as c:
        base = c.stats()
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(PROCESSES) as pool:
            pending = pool.starmap_async(
                workload.run_process,
                [
                    (router, prefix, 100 + i, OPS, deadline, PATHS[i % len(PATHS)])
                    for i in range(PROCESSES)
                ],
            )
            reports: list[workload.Report] = []
            lock = threading.Lock()

            def thread_main(writer: int) -> None:
                report = workload.run(c, prefix, writer, OPS, deadline)
                with lock:
                    reports.append(report)

            threads = [threading.Thread(target=thread_main, args=(i,)) for i in range(THREADS)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=max(1.0, deadline - time.time() + 30))
                assert not t.is_alive(), "a worker thread did not finish"
            reports.extend(pending.get(timeout=max(1.0, deadline - time.time() + 60)))

        assert len(reports) == THREADS + PROCESSES
        errors = [e for r in reports for e in r.errors]
        mismatches = [m for r in reports for m in r.mismatches]
        assert not errors, f"{len(errors)} operations failed; first:\n{errors[0]}"
        assert not mismatches, f"{len(mismatches)} wrong values; first: {mismatches[:5]}"
        assert sum(r.ops for r in reports) > 0
        assert sum(r.hits for r in reports) > 0  # the check did run on real values
        if sys.platform.startswith("linux"):  # the co-located path raced too
            assert c.metrics().get("local_reads", 0) > 0

        # Afterwards: every key is a miss or a checked value, and the nodes hold
        # exactly the stripes of the tensors still present (none leaked).
        keys = [workload.key_name(prefix, k) for k in range(workload.KEYS)]
        final = c.get_many(keys)
        expected_shards = 0
        present = 0
        for k, key in enumerate(keys):
            assert workload.check(k, final[key]) is None
            if final[key] is not None:
                present += 1
                if final[key].nbytes > workload.STRIPE_SIZE:
                    expected_shards += math.ceil(final[key].nbytes / workload.STRIPE_SIZE)
        stats = settled(c)
        assert total(stats, "evictions") == total(base, "evictions")  # else counts are moot
        assert total(stats, "keys") - total(base, "keys") == present
        assert total(stats, "shards") - total(base, "shards") == expected_shards


def test_the_checker_catches_torn_and_foreign_values():
    """The workload's check must be able to fail, or a green run proves nothing."""
    a, b = workload.make_value(2, 3, 7), workload.make_value(2, 4, 9)
    assert workload.check(2, a) is None and workload.check(2, None) is None
    n = min(a.size, b.size) // 2
    torn = a.copy()
    torn[n:] = 0
    torn[n : min(a.size, b.size)] = b[n : min(a.size, b.size)]
    assert workload.check(2, torn) is not None  # stripes of two puts
    assert workload.check(2, a[:-1]) is not None  # truncated
    assert workload.check(5, a) is not None  # another key's value
    assert workload.check(2, a.astype("<i8")) is not None  # wrong dtype
