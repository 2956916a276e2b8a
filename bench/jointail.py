"""``python -m bench.jointail``: where a get's tail during a join comes from (issue #17).

A smaller, instrumented cousin of ``bench.scale``'s three-node scenario:
``--entries`` small entries over ``--nodes`` nodes, a reader doing single
gets of random stored keys (one every ``--reader-interval``), then a join
and a leave of the joined node. Besides get p50/p99/max per phase it
records, for every slow get (over ``--slow-ms``), the second of the phase it
started in and the node that owns its key in the ring after the join (the
new node answers its misses by asking the previous owners), and samples
every node's CPU per thread from ``/proc/PID/task/*/stat`` (the busiest
threads per node and phase, so a background scan, the push receiver and the
data path can be told apart).

Prints a report; nothing is asserted. Every loop is bounded in count and
time; children are stopped on exit.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

import tensorcache
from bench.measure import percentile, progress
from bench.scale import EpochPoller, Reader, key, load3, wait_settled
from tensorcache.apps.cluster import LocalCluster
from tensorcache.wire import ring_from_snapshot

TICK = os.sysconf("SC_CLK_TCK")


def _thread_ticks(pid: int) -> dict[int, int]:
    """utime + stime of every thread of ``pid``, in clock ticks (unreadable: left out)."""
    out: dict[int, int] = {}
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
                fields = stat.rsplit(")", 1)[1].split()
                out[int(tid)] = int(fields[11]) + int(fields[12])
    return out


class CpuSampler(threading.Thread):
    """Per-thread CPU ticks of named processes, every ``interval_s``; bounded by ``max_s``."""

    def __init__(self, pids: dict[str, int], interval_s: float, max_s: float) -> None:
        super().__init__(name="jointail-cpu", daemon=True)
        self.pids = dict(pids)
        self.lock = threading.Lock()
        self.interval_s = interval_s
        self.max_s = max_s
        self.samples: list[tuple[float, dict[str, dict[int, int]]]] = []
        self.stop_event = threading.Event()

    def add(self, name: str, pid: int) -> None:
        with self.lock:
            self.pids[name] = pid

    def run(self) -> None:
        deadline = time.monotonic() + self.max_s
        while not self.stop_event.is_set() and time.monotonic() < deadline:
            with self.lock:
                pids = dict(self.pids)
            snap = {name: _thread_ticks(pid) for name, pid in pids.items()}
            self.samples.append((time.perf_counter(), snap))
            self.stop_event.wait(self.interval_s)

    def window(self, t0: float, t1: float) -> dict[str, Any]:
        """CPU % per process and its three busiest threads over [t0, t1]."""
        inside = [s for s in self.samples if t0 <= s[0] <= t1]
        if len(inside) < 2:
            return {}
        (ta, a), (tb, b) = inside[0], inside[-1]
        secs = tb - ta
        out: dict[str, Any] = {}
        for name, threads in b.items():
            before = a.get(name, {})
            used = {tid: t - before.get(tid, 0) for tid, t in threads.items()}
            top = sorted(used.values(), reverse=True)[:3]
            out[name] = {
                "cpu_pct": round(100 * sum(used.values()) / TICK / secs, 1),
                "top_threads_pct": [round(100 * t / TICK / secs, 1) for t in top],
            }
        return out


def slow_report(
    reader: Reader, t0: float, t1: float, slow_ms: float, owner: dict[int, str]
) -> dict[str, Any]:
    got = [s for s in reader.samples if t0 <= s.t <= t1]
    ms = [s.ms for s in got]
    slow = [s for s in got if s.ms > slow_ms]
    by_second = Counter(int(s.t - t0) for s in slow)
    by_owner = Counter(owner.get(s.i, "?") for s in slow)
    all_by_owner = Counter(owner.get(s.i, "?") for s in got)
    return {
        "gets": len(got),
        "p50_ms": round(percentile(ms, 50), 2) if ms else None,
        "p99_ms": round(percentile(ms, 99), 2) if ms else None,
        "max_ms": round(max(ms), 1) if ms else None,
        "failed": sum(s.outcome != "hit" for s in got),
        "slow": len(slow),
        "slow_by_second": dict(sorted(by_second.items())),
        "slow_by_owner": {k: f"{v}/{all_by_owner[k]}" for k, v in sorted(by_owner.items())},
        "slowest": [
            (round(s.t - t0, 2), owner.get(s.i, "?"), round(s.ms, 1))
            for s in sorted(slow, key=lambda s: -s.ms)[:8]
        ],
    }


def owners(poller: EpochPoller, entries: int) -> dict[int, str]:
    """The primary owner of every entry in the router's current ring."""
    ring = ring_from_snapshot(poller.read())
    return {i: ring.owner(key(i)).name for i in range(entries)}


@contextlib.contextmanager
def cluster(args: argparse.Namespace) -> Iterator[LocalCluster]:
    cl = LocalCluster(
        args.nodes,
        capacity=args.capacity,
        etcd="none",
        node_args=["--drain-timeout", str(args.drain_timeout), *args.node_args],
    )
    try:
        cl.start()
        yield cl
    finally:
        cl.stop(timeout=30.0)


def run_once(args: argparse.Namespace) -> None:
    print(f"== node args {args.node_args}; load at start {load3()}")
    with cluster(args) as cl:
        router = cl.router_address
        client = tensorcache.connect(router)
        t = time.perf_counter()
        for start in range(0, args.entries, args.batch):
            stop = min(args.entries, start + args.batch)
            client.put_many({key(i): np.array([i], np.int64) for i in range(start, stop)})
        progress(f"put {args.entries:,} in {time.perf_counter() - t:.1f} s")
        poller = EpochPoller(router, max_s=1800)
        sampler = CpuSampler({n: pr.pid for n, pr in cl.nodes.items()}, 0.25, 1800)
        sampler.start()
        reader = Reader(router, args.entries, 2_000_000, 1800, args.reader_interval)
        reader.start()
        phases: dict[str, tuple[float, float]] = {}
        settled: dict[str, float | None] = {}
        try:
            t_idle = time.perf_counter()
            time.sleep(2.0)
            t_join = time.perf_counter()
            proc = cl.add_node()
            sampler.add(proc.name, proc.pid)
            epoch = poller.read().epoch
            settled["join"], _, _ = wait_settled(client, set(cl.nodes), epoch, args.settle_cap_s)
            settled["join"] = time.perf_counter() - t_join
            time.sleep(1.0)
            owner = owners(poller, args.entries)
            phases = {"idle": (t_idle, t_join), "join": (t_join, time.perf_counter())}
            if not args.no_leave:
                t_leave = time.perf_counter()
                cl.stop_node(proc.name, timeout=args.drain_timeout + 30)
                epoch = poller.read().epoch
                wait_settled(client, set(cl.nodes), epoch, args.settle_cap_s)
                settled["leave"] = time.perf_counter() - t_leave
                time.sleep(1.0)
                phases["leave"] = (t_leave, time.perf_counter())
        finally:
            reader.finish()
            sampler.stop_event.set()
            sampler.join(5)
            poller.channel.close()
            client.close()
        for name, (a, b) in phases.items():
            took = f", settled after {settled[name]:.1f} s" if name in settled else ""
            print(f"-- {name} ({b - a:.1f} s window{took})")
            for k, v in slow_report(reader, a, b, args.slow_ms, owner).items():
                print(f"  {k}: {v}")
            for node, v in sampler.window(a, b).items():
                print(f"  cpu {node}: {v}")
    print(f"load at end {load3()}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.jointail", description=__doc__.split("\n")[0])
    p.add_argument("--entries", type=int, default=300_000)
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--batch", type=int, default=5000)
    p.add_argument("--capacity", default="2GiB")
    p.add_argument("--slow-ms", type=float, default=20.0)
    p.add_argument("--reader-interval", type=float, default=0.001)
    p.add_argument("--drain-timeout", type=float, default=300.0)
    p.add_argument("--settle-cap-s", type=float, default=300.0)
    p.add_argument("--no-leave", action="store_true")
    p.add_argument(
        "--variants",
        default="",
        help="';'-separated node flag sets run one after the other, repeated --rounds times "
        "(e.g. '--background-share 1;--background-share 0.5'); default: one run as is",
    )
    p.add_argument("--rounds", type=int, default=1)
    args = p.parse_args(argv)
    variants = [v.split() for v in args.variants.split(";")] if args.variants else [[]]
    for _ in range(max(1, args.rounds)):
        for v in variants:
            args.node_args = v
            run_once(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
