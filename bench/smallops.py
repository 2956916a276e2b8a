"""``python -m bench.smallops``: small operations, p50/p99 per call and batches, against Redis.

What a worker pays for the small calls around its tensors: a version check
(``version``, ``versions`` of many keys), a near-cache hit in both modes
(strict: revalidated with the owner every time; watch: served from process
memory while the router's event stream is live), a plain 4 KiB ``get`` and
``put``, a conditional put, a ``delete``, one at a time (each figure is the
per-request cost); and ``put_many``/``get_many`` of 64 and 256 4 KiB values
(items/s at the p50 call), against redis-py's MSET/MGET of the same.

Everything runs in one process against a 3-node ``LocalCluster`` and a
``redis-server`` (bench/peers.py) on loopback, in the same run, and the rows
of each group (single calls; batches) are **interleaved**: they take turns
in chunks of 50 calls, so the host's load moves them together. ``xget``: the
row's p50 over tensorcache's own 4 KiB get p50 (issue #18: a version check
<= 1x, a strict near hit <= 0.5x); ``xredis``: redis-py's p50 on the
comparable command (GET for reads, SET for writes, DEL for deletes, EXISTS
for version checks, MSET/MGET for batches) over the row's, so above 1 means
tensorcache is faster. The ``(grpc)`` rows are the same calls with
``transport="grpc"``. The ``(events gap 0)`` rows run against a second
cluster whose nodes publish one key event per commit, as before #18
(``--events-min-gap-ms 0``; ``--no-before`` skips it). The ``wire`` rows are
a GET frame and a head-only GET frame on a bare data connection (no client
library around them): the floors under ``get`` and ``version``.

Each row: ``--calls`` timed calls after a warm-up (batches: a tenth),
bounded by ``--max-row-seconds`` per row. Prints a table; writes
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
BATCHES = (64, 256)  # keys per put_many/get_many and MSET/MGET row
WARMUP = 50
CHUNK = 50  # calls per turn when rows are interleaved


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
    items: int = 1  # keys per call (batch rows)

    @property
    def items_per_s(self) -> float:
        return self.items / self.p50_us * 1e6


@dataclass
class Spec:
    """One row to measure: ``fn`` timed per call, ``setup`` untimed before each."""

    name: str
    system: str
    fn: Callable[[], object]
    setup: Callable[[], object] | None = None
    peer: str = ""
    items: int = 1


def measure(specs: list[Spec], calls: int, max_seconds: float, chunk: int = CHUNK) -> list[Row]:
    """Time ``calls`` single calls of every spec, interleaved in chunks.

    The rows of one group take turns (``chunk`` calls each, round-robin), so
    a change in the host's load (other sessions' test suites, a soak) falls
    on all of them alike and their ratios hold even when the absolute
    figures move. ``max_seconds`` bounds the group per row.
    """
    for spec in specs:
        for _ in range(min(WARMUP, calls)):
            if spec.setup is not None:
                spec.setup()
            spec.fn()
    times: list[list[float]] = [[] for _ in specs]
    deadline = time.monotonic() + max_seconds * len(specs)
    while time.monotonic() < deadline and any(len(t) < calls for t in times):
        for spec, ts in zip(specs, times, strict=True):
            for _ in range(min(chunk, calls - len(ts))):
                if spec.setup is not None:
                    spec.setup()
                t0 = time.perf_counter()
                spec.fn()
                ts.append(time.perf_counter() - t0)
    rows = []
    load = loadavg()
    for spec, ts in zip(specs, times, strict=True):
        us = [t * 1e6 for t in ts]
        row = Row(
            spec.name,
            spec.system,
            len(us),
            percentile(us, 50),
            percentile(us, 99),
            statistics.fmean(us),
            load,
            spec.peer,
            items=spec.items,
        )
        per = f"  {row.items_per_s:10,.0f} items/s" if spec.items > 1 else ""
        progress(
            f"{spec.system:11s} {spec.name:30s} p50 {row.p50_us:8.1f} us  "
            f"p99 {row.p99_us:8.1f} us{per}"
        )
        rows.append(row)
    return rows


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


def redis_specs(r: Any, payload: bytes) -> tuple[list[Spec], list[Spec]]:
    """(single-command rows, batch rows) of redis-py, on the same 4 KiB values."""
    r.set("bench/small/0", payload)
    single = [
        Spec("GET", "redis-py", lambda: r.get("bench/small/0")),
        Spec("SET", "redis-py", lambda: r.set("bench/small/w", payload)),
        Spec("EXISTS", "redis-py", lambda: r.exists("bench/small/0")),
        Spec(
            "DEL",
            "redis-py",
            lambda: r.delete("bench/small/del"),
            setup=lambda: r.set("bench/small/del", payload),
        ),
    ]
    batch = []
    for n in BATCHES:
        keys = [f"bench/many/{i}" for i in range(n)]
        mapping = dict.fromkeys(keys, payload)
        r.mset(mapping)
        batch += [
            Spec(f"MSET x{n}", "redis-py", lambda m=mapping: r.mset(m), items=n),
            Spec(f"MGET x{n}", "redis-py", lambda k=keys: r.mget(k), items=n),
        ]
    return single, batch


def run_all(
    router: str,
    before_router: str | None,
    snapshot: pb.RingSnapshot,
    r: Any,
    calls: int,
    max_s: float,
) -> list[Row]:
    """Every row, in two interleaved groups: single calls, then batches."""
    value = np.random.default_rng(0).integers(0, 255, SIZE, dtype=np.uint8)
    keys = [f"bench/small/{i}" for i in range(BATCH)]
    tc = "tensorcache"
    with contextlib.ExitStack() as stack:
        c = stack.enter_context(tensorcache.connect(router))
        g = stack.enter_context(tensorcache.connect(router, transport="grpc"))
        # The near-cache clients are closed before the batch group: a
        # watch-mode client's event thread would take every put_many's 64-256
        # events in this process, competing with the timed loop for its GIL.
        near = stack.enter_context(contextlib.ExitStack())
        strict = near.enter_context(tensorcache.connect(router, near_cache="64MiB"))
        watch = near.enter_context(
            tensorcache.connect(router, near_cache="64MiB", near_cache_mode="watch")
        )
        c.put_many({k: value for k in keys})
        # Interleaved rows must not write what others read: the reads (and
        # the near-caches' copies) use ``key``, each writing row a key of its own.
        key, dkey, wkey, ckey = keys[0], "bench/small/del", "bench/small/w", "bench/small/cond"
        state = {"v": c.put(ckey, value)}

        def cond_put() -> None:
            state["v"] = c.put(ckey, value, if_version=state["v"])

        # The wire alone: the same frames on one data connection, no client
        # library around them (what the calls cost beyond this is Python).
        ring = ring_from_snapshot(snapshot)
        conn = DataConn(ring.owner(key).data_address, 10.0)
        stack.callback(conn.close)
        entry = [pb.EntryKey(key=key.encode())]
        head = pb.GetRequest(epoch=ring.epoch, keys=entry, head_only=True).SerializeToString()
        full = pb.GetRequest(epoch=ring.epoch, keys=entry).SerializeToString()

        def wire_get() -> None:
            conn.control(OP_GET, full)
            conn.reader.read_exact(SIZE)

        strict.get(key)
        strict.get_many(keys)
        _wait_live(watch)
        watch.get(key)
        single = [
            Spec("get 4KiB", tc, lambda: c.get(key), peer="GET"),
            Spec("put 4KiB", tc, lambda: c.put(wkey, value), peer="SET"),
            Spec("put if_version 4KiB", tc, cond_put, peer="SET"),
            Spec("version", tc, lambda: c.version(key), peer="EXISTS"),
            Spec(f"versions x{BATCH}", tc, lambda: c.versions(keys), items=BATCH),
            Spec("get frame, bare socket", "wire", wire_get),
            Spec("head frame, bare socket", "wire", lambda: conn.control(OP_GET, head)),
            Spec("near hit, strict", tc, lambda: strict.get(key), peer="GET"),
            Spec(f"near hits x{BATCH}, strict", tc, lambda: strict.get_many(keys), items=BATCH),
            Spec("near hit, watch", tc, lambda: watch.get(key), peer="GET"),
            Spec(
                "delete", tc, lambda: c.delete(dkey), setup=lambda: c.put(dkey, value), peer="DEL"
            ),
            # The same calls over gRPC (transport="grpc"): the path every
            # control call took before they moved to the data channel.
            Spec("get 4KiB (grpc)", tc, lambda: g.get(key), peer="GET"),
            Spec("version (grpc)", tc, lambda: g.version(key), peer="EXISTS"),
        ]
        if before_router is not None:
            # Before #18: nodes publishing one key event per commit. With a
            # watch-mode client of its own, like the cluster above: its
            # thread in this process takes the events of that cluster's puts.
            b = stack.enter_context(tensorcache.connect(before_router))
            _wait_live(
                near.enter_context(
                    tensorcache.connect(before_router, near_cache="64MiB", near_cache_mode="watch")
                )
            )
            single += [
                Spec("put 4KiB (events gap 0)", tc, lambda: b.put(wkey, value), peer="SET"),
                Spec(
                    "delete (events gap 0)",
                    tc,
                    lambda: b.delete(dkey),
                    setup=lambda: b.put(dkey, value),
                    peer="DEL",
                ),
            ]
        batch: list[Spec] = []
        for n in BATCHES:
            many = [f"bench/many/{i}" for i in range(n)]
            mapping = dict.fromkeys(many, value)
            c.put_many(mapping)
            batch += [
                Spec(
                    f"put_many x{n}",
                    tc,
                    lambda m=mapping: c.put_many(m),
                    peer=f"MSET x{n}",
                    items=n,
                ),
                Spec(
                    f"get_many x{n}", tc, lambda k=many: c.get_many(k), peer=f"MGET x{n}", items=n
                ),
            ]
        if r is not None:
            rsingle, rbatch = redis_specs(r, value.tobytes())
            single += rsingle
            batch += rbatch
        rows = measure(single, calls, max_s)
        near.close()
        rows += measure(batch, max(1, calls // 10), max_s)
        if c.metrics().get("data_fallbacks", 0):
            print("note: the client fell back to gRPC during the run", file=sys.stderr)
    return rows


def ratios(rows: list[Row]) -> None:
    get = next(r for r in rows if r.system == "tensorcache" and r.name == "get 4KiB")
    redis = {r.name: r for r in rows if r.system == "redis-py"}
    for r in rows:
        if r.system != "tensorcache":
            continue
        r.xget = r.p50_us / get.p50_us if r.items == 1 else None
        if r.peer in redis:
            r.xredis = redis[r.peer].p50_us / r.p50_us


def table(rows: list[Row]) -> str:
    lines = [
        f"{'system':11s} {'operation':30s} {'p50 us':>9s} {'p99 us':>9s} {'calls':>6s} "
        f"{'xget':>6s} {'xredis':>14s} {'items/s':>10s} {'load':>5s}"
    ]
    for r in rows:
        xget = f"{r.xget:6.2f}" if r.xget is not None else f"{'':6s}"
        xredis = f"{r.xredis:5.2f} {r.peer:8s}" if r.xredis is not None else f"{'':14s}"
        per = f"{r.items_per_s:10,.0f}" if r.items > 1 else f"{'':10s}"
        lines.append(
            f"{r.system:11s} {r.name:30s} {r.p50_us:9.1f} {r.p99_us:9.1f} {r.calls:6d} "
            f"{xget} {xredis} {per} {r.load:5.1f}"
        )
    return "\n".join(lines)


def targets(rows: list[Row]) -> list[str]:
    """Issue #18's targets, each marked met or not."""
    by = {r.name: r for r in rows if r.system == "tensorcache"}
    out = []
    for name, limit in (("version", 1.0), ("near hit, strict", 0.5)):
        r = by.get(name)
        if r is not None and r.xget is not None:
            mark = "✓" if r.xget <= limit else "✗"
            out.append(f"{mark} {name}: {r.xget:.2f}x a 4 KiB get (target <= {limit}x)")
    for name in (
        "get 4KiB",
        "put 4KiB",
        *(f"{op} x{n}" for n in BATCHES for op in ("put_many", "get_many")),
    ):
        r = by.get(name)
        if r is not None and r.xredis is not None:
            mark = "✓" if r.xredis >= 1 else "✗"
            out.append(f"{mark} {name}: {r.xredis:.2f}x redis-py {r.peer} (target >= 1x)")
    for n in BATCHES:
        for op in ("put_many", "get_many"):
            r = by.get(f"{op} x{n}")
            if r is not None:
                mark = "✓" if r.items_per_s >= 100_000 else "✗"
                out.append(f"{mark} {op} x{n}: {r.items_per_s:,.0f} items/s (target >= 100,000)")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few hundred calls per row (smoke)")
    p.add_argument("--calls", type=int, default=None, help="timed calls per row (default 3000)")
    p.add_argument("--max-row-seconds", type=float, default=20.0)
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--no-redis", action="store_true")
    p.add_argument(
        "--no-before",
        action="store_true",
        help="skip the second cluster whose nodes publish one key event per commit",
    )
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)
    calls = args.calls or (300 if args.quick else 3000)
    if calls < 1 or args.max_row_seconds <= 0:
        p.error("--calls and --max-row-seconds must be > 0")
    started = datetime.now(UTC)
    progress(f"smallops: {calls} calls per row, {args.nodes} nodes, load {loadavg():.1f}")
    with peers.log_dir() as logs, contextlib.ExitStack() as stack:
        cluster = stack.enter_context(
            LocalCluster(args.nodes, capacity="256MiB", log_dir=logs / "cluster")
        )
        before = None
        if not args.no_before:
            before = stack.enter_context(
                LocalCluster(
                    args.nodes,
                    capacity="256MiB",
                    log_dir=logs / "before",
                    node_args=["--events-min-gap-ms", "0"],
                )
            )
        r = stack.enter_context(_maybe_redis(logs, not args.no_redis))
        rows = run_all(
            cluster.router_address,
            before.router_address if before is not None else None,
            cluster.ring(),
            r,
            calls,
            args.max_row_seconds,
        )
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
