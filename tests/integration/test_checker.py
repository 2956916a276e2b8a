"""The checker: client processes race on a few keys while nodes die and etcd restarts.

A cluster of 4 nodes (replicas=2, membership in a private etcd) serves 2
writer and 2 reader processes (checker_worker.py) for ``RUN_S`` seconds;
one reader invalidates the prefix "ns-b/" every few seconds, the other reads
through a near-cache. Meanwhile the test SIGKILLs a node and restarts it
under the same name, three times, never two nodes down at once, and
restarts etcd once. Every
operation is recorded with its start and end (``time.monotonic_ns``, one
clock for every process on the host), its key, its version and a checksum
of its value; checker_history.py then asserts on the whole history:

1. no get returns a version older than one whose put completed before the
   get began (per key);
2. no torn or foreign value: every value read is byte for byte one that was
   put under that key;
3. after ``invalidate(prefix)`` returned, no get returns a value whose put
   completed before the call;

and versions of a key are unique and follow the order of non-overlapping
puts. No assertion is on timing; loops are bounded by count and by time.
The summary line is printed (``pytest -s``) and written, with the counts, to
``checker-summary.json`` under the test's tmp dir, next to the histories and
the cluster's logs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import tensorcache
from tensorcache.apps.cluster import LocalCluster

from . import checker_history as history
from . import checker_worker as worker

pytestmark = pytest.mark.integration

NODES = 4
REPLICAS = 2
WRITERS = 2
READERS = 2
RUN_S = 24.0  # each worker's time bound (a bound, not an assertion)
MAX_OPS = 100_000  # each worker's count bound
INVALIDATED = "ns-b/"
INVALIDATE_EVERY_S = 4.0
NEAR_CACHE = "16MiB"  # readers other than the invalidating one use a near-cache
# "strict" (the default) must pass. "watch" serves hits without asking the
# owner, so it may be stale by the push delay, and the checker must go red:
# CHECKER_NEAR_CACHE_MODE=watch shows that it can.
NEAR_CACHE_MODE = os.environ.get("CHECKER_NEAR_CACHE_MODE", "strict")
WAIT_S = 30.0  # bound on any one wait for the cluster (ring change, worker exit slack)
WORKER_SCRIPT = Path(worker.__file__)


@pytest.fixture
def cluster(etcd_binary: str, tmp_path: Path) -> Iterator[LocalCluster]:
    c = LocalCluster(
        NODES, etcd="auto", replicas=REPLICAS, capacity="256MiB", log_dir=tmp_path / "cluster"
    ).start()
    try:
        assert c.etcd_url, "etcd is installed, so etcd='auto' must use it"
        yield c
    finally:
        c.stop()


# ------------------------------------------------------------------ faults
def _wait_ring(cluster: LocalCluster, ok: Callable[[dict[str, str]], bool], what: str) -> None:
    """Poll the router until ``ok({name: address})``; fail after WAIT_S."""
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            members = {m.name: m.address for m in cluster.ring().members}
        except Exception:  # the router may answer slowly while etcd restarts
            members = {}
        if members and ok(members):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {WAIT_S:.0f}s waiting for {what}: {members}")
        time.sleep(0.1)


def _kill_and_restart(cluster: LocalCluster, name: str, *, wait_expiry: bool) -> None:
    """SIGKILL ``name``; start a fresh node under the same name; wait until it serves.

    ``wait_expiry``: restart only after the ring dropped the dead node (its
    lease ran out), else at once (the new process re-registers the name).
    """
    cluster.stop_node(name, kill=True)
    if wait_expiry:
        _wait_ring(cluster, lambda m: name not in m, f"{name}'s lease to expire")
    proc = cluster.start_node(name, wait=False)
    _wait_ring(cluster, lambda m: m.get(name) == proc.address, f"{name} back at {proc.address}")


def run_faults(cluster: LocalCluster) -> list[dict[str, Any]]:
    """Kill and restart nodes one at a time, and etcd once, on a schedule; the events.

    Runs in the test's main thread on purpose: children arm
    PR_SET_PDEATHSIG, which Linux ties to the *thread* that started them, so
    a node or an etcd started from a helper thread dies when that thread ends.
    """
    t0 = time.monotonic()
    names = sorted(cluster.nodes)
    # (offset s, action): a node restarted after its lease expired, etcd
    # restarted, again a node whose lease must expire (so membership must
    # flow through the restarted etcd), then one restarted at once.
    plan: list[tuple[float, str]] = [
        (3.0, f"kill {names[1]} wait"),
        (8.0, "etcd"),
        (11.0, f"kill {names[2]} wait"),
        (17.0, f"kill {names[3]} now"),
    ]
    events: list[dict[str, Any]] = []
    for offset, action in plan:
        time.sleep(max(0.0, t0 + offset - time.monotonic()))
        start = time.monotonic_ns()
        if action == "etcd":
            cluster.restart_etcd()
            what = "etcd restart"
        else:
            _, name, when = action.split()
            _kill_and_restart(cluster, name, wait_expiry=when == "wait")
            what = f"kill -9 + restart {name} ({when})"
        events.append({"what": what, "start": start, "end": time.monotonic_ns()})
    return events


# ------------------------------------------------------------------ workers
class Worker:
    """One checker_worker.py process; its stderr goes to a file beside its history."""

    def __init__(self, cluster: LocalCluster, role: str, wid: int, out: Path, *extra: str):
        self.name = f"{role}-{wid}"
        self.stderr = out.with_suffix(".stderr")
        with open(self.stderr, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    str(WORKER_SCRIPT),
                    "--router",
                    cluster.router_address,
                    "--role",
                    role,
                    "--id",
                    str(wid),
                    "--out",
                    str(out),
                    "--seconds",
                    str(RUN_S),
                    "--max-ops",
                    str(MAX_OPS),
                    "--seed",
                    str(1000 + wid),
                    *extra,
                ],
                stdout=subprocess.PIPE,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )

    def finish(self) -> dict:
        """Wait (bounded) for the worker; its closing report line."""
        try:
            stdout, _ = self.proc.communicate(timeout=RUN_S + 2 * WAIT_S)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"{self.name} overran its bound of {RUN_S:.0f}s")
        tail = self.stderr.read_text(errors="replace")[-3000:]
        assert self.proc.returncode == 0, f"{self.name} exited {self.proc.returncode}:\n{tail}"
        return json.loads(stdout.decode().strip().splitlines()[-1])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _prime(c: tensorcache.Client, out: Path) -> None:
    """Put a value under every key first, so reads hit from the start (recorded too)."""
    wid = 100
    with open(out, "a", encoding="utf-8") as f:
        log = worker.Log(f, "primer")
        for seq, key in enumerate(worker.KEYS):
            value = worker.make_value(key, wid, seq)
            start = time.monotonic_ns()
            log.write(
                op="put",
                phase="begin",
                writer=wid,
                seq=seq,
                key=key,
                checksum=worker.checksum(value),
                start=start,
            )
            version = c.put(key, value)
            log.write(op="put", phase="end", seq=seq, end=time.monotonic_ns(), version=version)


def _final_reads(c: tensorcache.Client, out: Path) -> None:
    """Read every key once after the storm (recorded: these are checked like any get).

    Bounded by WAIT_S in all: a key not reached by then is not read.
    """
    deadline = time.monotonic() + WAIT_S
    with open(out, "a", encoding="utf-8") as f:
        log = worker.Log(f, "final")
        for key in worker.KEYS:
            if time.monotonic() > deadline:
                break
            start = time.monotonic_ns()
            try:
                got = c.get(key)
            except tensorcache.TensorCacheError as exc:
                log.write(
                    op="get",
                    key=key,
                    start=start,
                    end=time.monotonic_ns(),
                    error=worker.describe(exc),
                )
                continue
            worker.record_get(log, key, start, time.monotonic_ns(), got)


# ------------------------------------------------------------------ the test
def test_checker_under_node_kills_and_an_etcd_restart(cluster: LocalCluster, tmp_path: Path):
    hist_dir = tmp_path / "histories"
    hist_dir.mkdir()
    with tensorcache.connect(
        cluster.router_address, stripe_size=worker.STRIPE_SIZE, retries=12, timeout_s=20.0
    ) as c:
        _prime(c, hist_dir / "primer.jsonl")

    # Reader 0 invalidates now and then; the others read through a near-cache.
    invalidator = ["--invalidate", INVALIDATED, "--invalidate-every", str(INVALIDATE_EVERY_S)]
    workers = [Worker(cluster, "writer", i, hist_dir / f"writer-{i}.jsonl") for i in range(WRITERS)]
    workers += [
        Worker(
            cluster,
            "reader",
            10 + i,
            hist_dir / f"reader-{i}.jsonl",
            *(
                invalidator
                if i == 0
                else ["--near-cache", NEAR_CACHE, "--near-cache-mode", NEAR_CACHE_MODE]
            ),
        )
        for i in range(READERS)
    ]
    try:
        faults = run_faults(cluster)
        reports = [w.finish() for w in workers]
    finally:
        for w in workers:
            w.kill()

    # Settled: the ring lists every node at the address it lives at now.
    live = {name: proc.address for name, proc in cluster.nodes.items()}
    _wait_ring(cluster, lambda m: m == live, "the ring to list every live node where it is")
    with tensorcache.connect(cluster.router_address, stripe_size=worker.STRIPE_SIZE) as c:
        _final_reads(c, hist_dir / "final.jsonl")

    h = history.load(sorted(hist_dir.glob("*.jsonl")))
    violations = history.check_all(h)
    summary = history.summarize(
        h,
        violations,
        extra={
            "processes": len(workers),
            "nodes": NODES,
            "replicas": REPLICAS,
            "node_kills": sum(e["what"].startswith("kill") for e in faults),
            "etcd_restarts": sum(e["what"] == "etcd restart" for e in faults),
            "faults": faults,
            "workers": {r["worker"]: r for r in reports},
        },
    )
    coverage = summary["coverage"]
    coverage["striped_hits"] = sum(g.found and worker.is_large(g.key) for g in h.gets)
    line = history.summary_line(summary)
    print("\n" + line)
    (tmp_path / "checker-summary.json").write_text(
        json.dumps(
            {"line": line, **summary, "first_violations": history.first(violations)}, indent=2
        )
    )

    assert not any(violations.values()), f"{line}\n{history.first(violations)}"
    # Guarantee 6: R = 2 and never two nodes down at once, so no completed put
    # may be lost (re-replication refills each restarted node before the next
    # kill; handoff covers the gap) and no get may fail.
    assert summary["unexpected_misses"] == 0, f"data lost: {line}"
    assert summary["get_errors"] == 0, f"gets failed: {line}"
    unexpected = {k: n for k, n in summary["errors_by_type"].items() if k.startswith("unexpected")}
    assert not unexpected, f"errors that are not TensorCacheError: {unexpected}"
    # The run must have exercised what it claims to check.
    assert summary["node_kills"] == 3 and summary["etcd_restarts"] == 1
    assert summary["puts_ok"] > 0 and summary["hits"] > 0
    assert summary["invalidations_ok"] > 0
    assert coverage["striped_hits"] > 0, "no striped value was read"
    assert coverage["reads_with_floor"] > 0, "no read followed a completed put: (1) checked nothing"
    assert coverage["reads_after_invalidation"] > 0, "(3) checked nothing"
