"""``python -m bench.smallops``: control-size operations, p50/p99 per call, against Redis.

What a worker pays for the small calls around its tensors: a version check
(``version``, ``versions`` of many keys), a near-cache hit in both modes
(strict: revalidated with the owner every time; watch: served from process
memory while the router's event stream is live), a plain 4 KiB ``get`` and
``put``, a conditional put, a ``delete``. One at a time, so each figure is
the per-request cost, not a throughput.

Everything runs in one process against a 3-node ``LocalCluster`` and a
``redis-server`` (bench/peers.py) on loopback, in the same run: the
``xget`` column is the row's p50 over tensorcache's own 4 KiB get p50 (the
issue #18 targets: a version check <= 1x, a strict near hit <= 0.5x); the
``xredis`` column is redis-py's p50 on the comparable command (GET for reads,
SET for writes, DEL for deletes, EXISTS for version checks) over the row's,
so above 1 means tensorcache is faster. The ``(grpc)`` rows are the same
calls with ``transport="grpc"``: the path every control call took before
they moved to the data channel. The ``wire`` row is a head-only GET frame on
a bare data connection (no client library around it): the floor under
``version``.

Each row: ``--calls`` timed calls after a warm-up, bounded by
``--max-row-seconds``. Prints a table; writes
``bench/results/smallops-<UTC>.json``. ``--quick``: a few hundred calls (CI
smoke). The load average is printed with every row: the figures move with
whatever else the host runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

import tensorcache
from bench import peers
from bench.measure import loadavg, percentile, progress
from tensorcache.apps.cluster import LocalCluster
from tensorcache.client.datachannel import DataConn
from tensorcache.dataproto import OP_GET
from tensorcache.proto import tensorcache_pb2 as pb
from tensorcache.wire import ring_from_snapshot

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SIZE = 4096
BATCH = 64  # keys per versions()/get_many() row
WARMUP = 50


@dataclass
class Row:
    name: str
    system: str
    calls: int
    p50_us: float
    p99_us: float
    mean_us: float
    load: float
    peer: str = ""  # the redis row it is compared with
    xget: float | None = None
    xredis: float | None = None


def measure(
    name: str,
    system: str,
    fn: Callable[[], object],
    calls: int,
    max_seconds: float,
    setup: Callable[[], object] | None = None,
    peer: str = "",
) -> Row:
    """Time ``calls`` single calls of ``fn`` (``setup`` before each, untimed)."""
    for _ in range(min(WARMUP, calls)):
        if setup is not None:
            setup()
        fn()
    times: list[float] = []
    deadline = time.monotonic() + max_seconds
    while len(times) < calls and time.monotonic() < deadline:
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    us = [t * 1e6 for t in times]
    row = Row(
        name,
        system,
        len(us),
        percentile(us, 50),
        percentile(us, 99),
        statistics.fmean(us),
        loadavg(),
        peer,
    )
    progress(f"{system:11s} {name:28s} p50 {row.p50_us:8.1f} us  p99 {row.p99_us:8.1f} us")
    return row


@contextlib.contextmanager
def _maybe_redis(log_dir: Path, enabled: bool) -> Iterator[Any]:
    if not enabled:
        yield None
        return
    try:
        with peers.redis_server(log_dir) as server:
            import redis

            r = redis.Redis(server.host, server.port)
            try:
                yield r
            finally:
                r.close()
    except peers.PeerUnavailable as exc:
        print(f"note: redis skipped: {exc}", file=sys.stderr)
        yield None


def _wait_live(c: tensorcache.Client, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not c.metrics().get("watch_live"):
        if time.monotonic() > deadline:
            raise RuntimeError("the watch-mode client's event stream never became live")
        time.sleep(0.02)


def tensorcache_rows(router: str, snapshot: pb.RingSnapshot, calls: int, max_s: float) -> list[Row]:
    value = np.random.default_rng(0).integers(0, 255, SIZE, dtype=np.uint8)
    keys = [f"bench/small/{i}" for i in range(BATCH)]
    rows: list[Row] = []
    tc = "tensorcache"
    with (
        tensorcache.connect(router) as c,
        tensorcache.connect(router, transport="grpc") as g,
        tensorcache.connect(router, near_cache="64MiB") as strict,
        tensorcache.connect(router, near_cache="64MiB", near_cache_mode="watch") as watch,
    ):
        c.put_many({k: value for k in keys})
        key = keys[0]
        rows.append(measure("get 4KiB", tc, lambda: c.get(key), calls, max_s, peer="GET"))
        rows.append(measure("put 4KiB", tc, lambda: c.put(key, value), calls, max_s, peer="SET"))
        state = {"v": c.version(key) or 0}

        def cond_put() -> None:
            state["v"] = c.put(key, value, if_version=state["v"])

        rows.append(measure("put if_version 4KiB", tc, cond_put, calls, max_s, peer="SET"))
        rows.append(measure("version", tc, lambda: c.version(key), calls, max_s, peer="EXISTS"))
        rows.append(measure(f"versions x{BATCH}", tc, lambda: c.versions(keys), calls, max_s))
        # The wire alone: the same head-only GET frame on one data connection,
        # no client library around it (what version() costs beyond this is Python).
        ring = ring_from_snapshot(snapshot)
        conn = DataConn(ring.owner(key).data_address, 10.0)
        head = pb.GetRequest(
            epoch=ring.epoch, keys=[pb.EntryKey(key=key.encode())], head_only=True
        ).SerializeToString()
        try:
            rows.append(
                measure(
                    "head frame, bare socket",
                    "wire",
                    lambda: conn.control(OP_GET, head),
                    calls,
                    max_s,
                )
            )
        finally:
            conn.close()
        strict.get(key)
        strict.get_many(keys)
        rows.append(
            measure("near hit, strict", tc, lambda: strict.get(key), calls, max_s, peer="GET")
        )
        rows.append(
            measure(f"near hits x{BATCH}, strict", tc, lambda: strict.get_many(keys), calls, max_s)
        )
        _wait_live(watch)
        watch.get(key)
        rows.append(
            measure("near hit, watch", tc, lambda: watch.get(key), calls, max_s, peer="GET")
        )
        dkey = "bench/small/del"
        rows.append(
            measure(
                "delete",
                tc,
                lambda: c.delete(dkey),
                calls,
                max_s,
                setup=lambda: c.put(dkey, value),
                peer="DEL",
            )
        )
        # Before: the same control calls over gRPC (transport="grpc").
        rows.append(measure("get 4KiB (grpc)", tc, lambda: g.get(key), calls, max_s, peer="GET"))
        rows.append(
            measure("version (grpc)", tc, lambda: g.version(key), calls, max_s, peer="EXISTS")
        )
        rows.append(
            measure(
                "delete (grpc)",
                tc,
                lambda: g.delete(dkey),
                calls,
                max_s,
                setup=lambda: c.put(dkey, value),
                peer="DEL",
            )
        )
        if c.metrics().get("data_fallbacks", 0):
            print("note: the client fell back to gRPC during the run", file=sys.stderr)
    return rows


def redis_rows(r: Any, calls: int, max_s: float) -> list[Row]:
    payload = np.random.default_rng(0).integers(0, 255, SIZE, dtype=np.uint8).tobytes()
    r.set("bench/small/0", payload)
    rows = [
        measure("GET", "redis-py", lambda: r.get("bench/small/0"), calls, max_s),
        measure("SET", "redis-py", lambda: r.set("bench/small/0", payload), calls, max_s),
        measure("EXISTS", "redis-py", lambda: r.exists("bench/small/0"), calls, max_s),
        measure(
            "DEL",
            "redis-py",
            lambda: r.delete("bench/small/del"),
            calls,
            max_s,
            setup=lambda: r.set("bench/small/del", payload),
        ),
    ]
    return rows


def ratios(rows: list[Row]) -> None:
    get = next(r for r in rows if r.system == "tensorcache" and r.name == "get 4KiB")
    redis = {r.name: r for r in rows if r.system == "redis-py"}
    for r in rows:
        if r.system != "tensorcache":
            continue
        r.xget = r.p50_us / get.p50_us
        if r.peer in redis:
            r.xredis = redis[r.peer].p50_us / r.p50_us


def table(rows: list[Row]) -> str:
    lines = [
        f"{'system':11s} {'operation':28s} {'p50 us':>8s} {'p99 us':>8s} {'calls':>6s} "
        f"{'xget':>6s} {'xredis':>10s} {'load':>5s}"
    ]
    for r in rows:
        xget = f"{r.xget:6.2f}" if r.xget is not None else f"{'':6s}"
        xredis = f"{r.xredis:5.2f} {r.peer:4s}" if r.xredis is not None else f"{'':10s}"
        lines.append(
            f"{r.system:11s} {r.name:28s} {r.p50_us:8.1f} {r.p99_us:8.1f} {r.calls:6d} "
            f"{xget} {xredis} {r.load:5.1f}"
        )
    return "\n".join(lines)


def targets(rows: list[Row]) -> list[str]:
    by = {r.name: r for r in rows if r.system == "tensorcache"}
    out = []
    for name, limit in (("version", 1.0), ("near hit, strict", 0.5)):
        r = by.get(name)
        if r is not None and r.xget is not None:
            mark = "✓" if r.xget <= limit else "✗"
            out.append(f"{mark} {name}: {r.xget:.2f}x a 4 KiB get (target <= {limit}x)")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few hundred calls per row (smoke)")
    p.add_argument("--calls", type=int, default=None, help="timed calls per row (default 3000)")
    p.add_argument("--max-row-seconds", type=float, default=20.0)
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--no-redis", action="store_true")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)
    calls = args.calls or (300 if args.quick else 3000)
    if calls < 1 or args.max_row_seconds <= 0:
        p.error("--calls and --max-row-seconds must be > 0")
    started = datetime.now(UTC)
    progress(f"smallops: {calls} calls per row, {args.nodes} nodes, load {loadavg():.1f}")
    with peers.log_dir() as logs:
        with LocalCluster(args.nodes, capacity="256MiB", log_dir=logs / "cluster") as cluster:
            rows = tensorcache_rows(
                cluster.router_address, cluster.ring(), calls, args.max_row_seconds
            )
        with _maybe_redis(logs, not args.no_redis) as r:
            if r is not None:
                rows += redis_rows(r, calls, args.max_row_seconds)
    ratios(rows)
    print(
        f"\nsmall operations, {SIZE} B values, one call at a time "
        f"({args.nodes} nodes + client on one host; load {loadavg():.1f})"
    )
    print(table(rows))
    print("\n".join(targets(rows)))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / f"smallops-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_text(
        json.dumps(
            {
                "started": started.isoformat(),
                "calls": calls,
                "nodes": args.nodes,
                "rows": [asdict(r) for r in rows],
                "targets": targets(rows),
            },
            indent=1,
        )
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
