"""``python -m bench.staleness``: the watch-mode near-cache's staleness bound, measured.

In watch mode a near-cache hit is served with no call, so after another
worker's put returns, a watcher may serve its old copy until the key event
reaches it: node commit -> node publisher (batches every ~5 ms) -> router
``Publish`` -> router ``Watch`` stream -> the watcher's thread. This script
measures exactly that window: a writer puts new versions of a few keys at a
steady pace; an ``EventWatcher`` (the one watch-mode clients use) records
when each (key, version) event arrives; staleness = arrival - the moment the
put returned (0 when the event beat the reply). All on one host, so both
ends read the same CLOCK_MONOTONIC. Also measured under load: readers
hammering the same cluster with gets while the writer runs.

Prints a table (p50 / p90 / p99 / max in ms) and writes
``bench/results/staleness-<UTC>.json``. Bounded: ``--puts`` per phase and a
wall-clock cap.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

import tensorcache
from tensorcache.apps.cluster import LocalCluster
from tensorcache.client.nearcache import NearCache
from tensorcache.client.transport import RouterConn
from tensorcache.client.watch import EventWatcher
from tensorcache.proto import tensorcache_pb2 as pb

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def measure(router: str, puts: int, interval_s: float, readers: int, cap_s: float) -> dict:
    arrivals: dict[tuple[str, int], int] = {}
    lock = threading.Lock()

    def listener(event: pb.WatchEvent, arrived_ns: int) -> None:
        with lock:
            for ke in event.keys:
                arrivals.setdefault((ke.key.decode(), ke.version), arrived_ns)

    conn = RouterConn(router)
    watcher = EventWatcher(conn, NearCache(1 << 20), listener=listener)
    if not watcher.wait_live(30):
        raise SystemExit("the router's event stream did not come up within 30 s")
    stop = threading.Event()
    read_ops = [0]

    def reader(i: int) -> None:
        with tensorcache.connect(router) as c:
            while not stop.is_set():
                c.get(f"stale/{i % 4}")
                read_ops[0] += 1

    threads = [threading.Thread(target=reader, args=(i,), daemon=True) for i in range(readers)]
    for t in threads:
        t.start()
    done: list[tuple[str, int, int]] = []
    value = np.zeros(1024, np.float32)
    deadline = time.monotonic() + cap_s
    with tensorcache.connect(router) as writer:
        for i in range(puts):
            if time.monotonic() > deadline:
                break
            key = f"stale/{i % 4}"
            value[0] = i
            version = writer.put(key, value)
            done.append((key, version, time.monotonic_ns()))
            time.sleep(interval_s)
    # Wait (bounded) for the last events.
    end = time.monotonic() + 5
    while time.monotonic() < end:
        with lock:
            if all((k, v) in arrivals for k, v, _ in done):
                break
        time.sleep(0.01)
    stop.set()
    for t in threads:
        t.join(timeout=10)
    watcher.close()
    conn.close()
    delays = []
    lost = 0
    for key, version, t_done in done:
        arrived = arrivals.get((key, version))
        if arrived is None:
            lost += 1
            continue
        delays.append(max(0, arrived - t_done) / 1e6)
    return {
        "puts": len(done),
        "readers": readers,
        "read_ops": read_ops[0],
        "events_missing": lost,
        "p50_ms": _pct(delays, 50),
        "p90_ms": _pct(delays, 90),
        "p99_ms": _pct(delays, 99),
        "max_ms": max(delays) if delays else float("nan"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.staleness", description=__doc__)
    p.add_argument("--router", help="measure an existing cluster (default: start 3 nodes)")
    p.add_argument("--puts", type=int, default=500, help="puts per phase")
    p.add_argument("--interval-ms", type=float, default=2.0)
    p.add_argument("--readers", type=int, default=4, help="reader threads in the loaded phase")
    p.add_argument("--cap-s", type=float, default=60.0, help="wall-clock cap per phase")
    args = p.parse_args(argv)
    cluster = None
    router = args.router
    if router is None:
        cluster = LocalCluster(3).start()
        router = cluster.router_address
    try:
        rows = [
            ("idle", measure(router, args.puts, args.interval_ms / 1000, 0, args.cap_s)),
            (
                f"{args.readers} readers",
                measure(router, args.puts, args.interval_ms / 1000, args.readers, args.cap_s),
            ),
        ]
    finally:
        if cluster is not None:
            cluster.stop()
    print("watch-mode staleness: put returned -> key event at a watcher (ms)")
    print(f"{'phase':<12} {'puts':>6} {'p50':>8} {'p90':>8} {'p99':>8} {'max':>8} {'missing':>8}")
    for name, r in rows:
        print(
            f"{name:<12} {r['puts']:>6} {r['p50_ms']:>8.2f} {r['p90_ms']:>8.2f} "
            f"{r['p99_ms']:>8.2f} {r['max_ms']:>8.2f} {r['events_missing']:>8}"
        )
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = RESULTS_DIR / f"staleness-{stamp}.json"
    out.write_text(json.dumps(dict(rows), indent=2))
    print(f"wrote {out}")
    return 1 if any(r["events_missing"] for _, r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
