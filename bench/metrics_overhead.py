"""``python -m bench.metrics_overhead``: get/put throughput with metrics on vs off.

Two identical local clusters run side by side: one started with
``--metrics-port`` (every process exports, the nodes record each request's
time, status and bytes) and scraped every second by a background thread
(15 times Prometheus's usual rate), with a client connected with
``metrics=True`` (its calls timed too); the other with metrics off. Rounds
alternate off, on, off, on, ... so drift on a shared machine hits both
sides alike, and each case reports the median over its rounds and the
ratio on/off (target: within 3 %, i.e. >= 0.97).

Cases: single-key 4 KiB puts and gets (ops/s: where a per-request cost
shows most), ``get_many`` of 1000 x 4 KiB (items/s), and one 64 MiB put and
get (GB/s), over the data channel (``local_fastpath=False``) so every byte
crosses the instrumented path. Every loop is bounded in count and time.
Prints a table; writes ``bench/results/metrics-<UTC>.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

import tensorcache
from bench.measure import MIB, loadavg
from tensorcache.apps.cluster import LocalCluster

RESULTS_DIR = Path(__file__).resolve().parent / "results"
TARGET = 0.97


@contextmanager
def scraping(addresses: list[str], interval_s: float) -> Iterator[list[int]]:
    """Scrape every address each ``interval_s`` in the background; yields the scrape count."""
    stop = threading.Event()
    done = [0]

    def run() -> None:
        while not stop.wait(interval_s):
            for a in addresses:
                with urllib.request.urlopen(f"http://{a}/metrics", timeout=10) as r:
                    r.read()
            done[0] += 1

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        yield done
    finally:
        stop.set()
        t.join(timeout=30)


def _timed(fn: Callable[[int], None], seconds: float, max_ops: int) -> tuple[int, float]:
    """Run ``fn(i)`` for about ``seconds`` (at most ``max_ops`` calls): (calls, elapsed)."""
    start = time.perf_counter()
    deadline = start + seconds
    n = 0
    while n < max_ops and time.perf_counter() < deadline:
        fn(n)
        n += 1
    return n, time.perf_counter() - start


def cases(quick: bool) -> list[tuple[str, str, Callable[[Any, str], Callable[[], float]]]]:
    """(name, unit, make(client, tag) -> one measurement) for each case."""
    small = np.random.default_rng(0).integers(0, 255, 4096, dtype=np.uint8)
    big = np.random.default_rng(1).integers(0, 255, (4 if quick else 64) * MIB, dtype=np.uint8)
    seconds = 0.3 if quick else 2.0
    many = 100 if quick else 1000

    def put_small(c: Any, tag: str) -> Callable[[], float]:
        def one() -> float:
            n, dt = _timed(lambda i: c.put(f"{tag}/s/{i % 2000}", small), seconds, 200_000)
            return n / dt

        return one

    def get_small(c: Any, tag: str) -> Callable[[], float]:
        for i in range(2000):
            c.put(f"{tag}/g/{i}", small)

        def one() -> float:
            n, dt = _timed(lambda i: c.get(f"{tag}/g/{i % 2000}"), seconds, 200_000)
            return n / dt

        return one

    def get_many(c: Any, tag: str) -> Callable[[], float]:
        keys = [f"{tag}/m/{i}" for i in range(many)]
        c.put_many(dict.fromkeys(keys, small))

        def one() -> float:
            n, dt = _timed(lambda _: c.get_many(keys), seconds, 10_000)
            return n * many / dt

        return one

    def put_big(c: Any, tag: str) -> Callable[[], float]:
        def one() -> float:
            n, dt = _timed(lambda _: c.put(f"{tag}/big", big), seconds, 1000)
            return n * big.nbytes / dt / 1e9

        return one

    def get_big(c: Any, tag: str) -> Callable[[], float]:
        c.put(f"{tag}/bigr", big)
        out = np.empty_like(big)

        def one() -> float:
            n, dt = _timed(lambda _: c.get(f"{tag}/bigr", out=out), seconds, 1000)
            return n * big.nbytes / dt / 1e9

        return one

    size = f"{big.nbytes // MIB} MiB"
    return [
        ("put 4 KiB", "ops/s", put_small),
        ("get 4 KiB", "ops/s", get_small),
        (f"get_many {many} x 4 KiB", "items/s", get_many),
        (f"put {size}", "GB/s", put_big),
        (f"get {size}", "GB/s", get_big),
    ]


def recording_cost(n: int = 100_000) -> dict[str, float]:
    """What recording adds per request, timed in this process (µs): the node's
    ``NodeMetrics.done`` with its two clock reads, and a client's timed call
    (its wrapper and observation) around a call that does nothing."""
    from tensorcache.client.metrics import timed
    from tensorcache.metrics import Recorder
    from tensorcache.node.metrics import NodeMetrics

    node = NodeMetrics()
    t0 = time.perf_counter()
    for _ in range(n):
        start = time.perf_counter()
        node.done("get", "data", "OK", time.perf_counter() - start, 0, 4096, 0)
    node_us = (time.perf_counter() - t0) / n * 1e6

    class Timed:
        def __init__(self, on: bool) -> None:
            self._timing = Recorder() if on else None

        @timed("get")
        def get(self) -> None:
            return None

    def per_call(obj: Timed) -> float:
        t = time.perf_counter()
        for _ in range(n):
            obj.get()
        return (time.perf_counter() - t) / n * 1e6

    client_us = per_call(Timed(True)) - per_call(Timed(False))
    return {"node_us": node_us, "client_us": max(0.0, client_us)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, one round (CI smoke)")
    p.add_argument("--rounds", type=int, default=None, help="rounds per side (default 7)")
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--scrape-interval", type=float, default=1.0, help="seconds (default 1)")
    p.add_argument(
        "--control",
        action="store_true",
        help="A/A control: metrics on in both clusters and clients (the 'off' column is the "
        "first cluster): how far two identical clusters differ on this host",
    )
    p.add_argument(
        "--on-first",
        action="store_true",
        help="start the metrics-on cluster first (by default it is the second): shows whether "
        "a difference follows the metrics or the order the clusters started in",
    )
    p.add_argument("--out-dir", default=str(RESULTS_DIR))
    args = p.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 7)
    if rounds < 1:
        p.error("--rounds must be >= 1")
    started = datetime.now(UTC)
    rows: list[dict[str, Any]] = []
    with ExitStack() as stack:
        clusters = {
            side: stack.enter_context(
                LocalCluster(args.nodes, capacity="1GiB", metrics=(side == "on"))
                if not args.control
                else LocalCluster(args.nodes, capacity="1GiB", metrics=True)
            )
            for side in (("on", "off") if args.on_first else ("off", "on"))
        }
        on = clusters["on"]
        assert on.router is not None
        scraped = list(clusters.values()) if args.control else [on]
        targets = [
            a
            for c in scraped
            if c.router is not None
            for a in (c.router.metrics_address, *(n.metrics_address for n in c.nodes.values()))
        ]
        clients = {
            side: stack.enter_context(
                tensorcache.connect(
                    c.router_address, local_fastpath=False, metrics=args.control or side == "on"
                )
            )
            for side, c in clusters.items()
        }
        scrapes = stack.enter_context(scraping(targets, args.scrape_interval))
        for name, unit, make in cases(args.quick):
            # The same key names on both sides (the clusters are separate):
            # a striped tensor's stripes then fall on the nodes alike. With
            # "off/..." and "on/..." keys a 64 MiB get split its 8 stripes
            # differently over the 2 nodes and read ~9 % slower on one side,
            # in every round, whichever side had metrics (or with metrics on
            # both: --control).
            measure = {side: make(clients[side], "bench") for side in ("off", "on")}
            got: dict[str, list[float]] = {"off": [], "on": []}
            for r in range(rounds):
                # Interleaved, and in alternating order (off-on, on-off, ...):
                # drift and whatever the second of a pair inherits from the
                # first hit both sides alike.
                for side in ("off", "on") if r % 2 == 0 else ("on", "off"):
                    got[side].append(measure[side]())
            off, on_ = statistics.median(got["off"]), statistics.median(got["on"])
            # Each round's on/off pair ran back to back: their ratio is the
            # least disturbed by load that comes and goes.
            paired = [b / a for a, b in zip(got["off"], got["on"], strict=True) if a]
            rows.append(
                {
                    "case": name,
                    "unit": unit,
                    "off": off,
                    "on": on_,
                    "ratio": on_ / off if off else float("nan"),
                    "paired": statistics.median(paired),
                    "paired_min": min(paired),
                    "paired_max": max(paired),
                    "off_rounds": got["off"],
                    "on_rounds": got["on"],
                }
            )
            print(f"  {name}: off {off:,.2f}  on {on_:,.2f} {unit}", flush=True)
        n_scrapes = scrapes[0]
    print()
    print(
        f"metrics on vs off: {args.nodes} nodes per cluster, data channel, {rounds} "
        f"interleaved rounds per side, medians; {n_scrapes} scrapes of "
        f"{len(targets)} targets while on; load average {loadavg()}"
    )
    width = max(len(r["case"]) for r in rows)
    print(
        f"{'case':<{width}}  {'unit':<8} {'off':>12} {'on':>12} {'on/off':>7} "
        f"{'paired':>7}  {'paired range':>13}"
    )
    for r in rows:
        flag = "" if r["paired"] >= TARGET else "  (below 0.97)"
        print(
            f"{r['case']:<{width}}  {r['unit']:<8} {r['off']:>12,.2f} {r['on']:>12,.2f} "
            f"{r['ratio']:>7.3f} {r['paired']:>7.3f}  {r['paired_min']:.2f}..{r['paired_max']:.2f}"
            f"{flag}"
        )
    cost = recording_cost()
    get_us = next((1e6 / r["off"] for r in rows if r["case"] == "get 4 KiB" and r["off"]), 0.0)
    print(
        f"recording, in process: node {cost['node_us']:.2f} µs per request, client "
        f"{cost['client_us']:.2f} µs per call; a 4 KiB get took {get_us:.0f} µs here "
        f"(off), so recording is {100 * (cost['node_us'] + cost['client_us']) / get_us:.1f} % "
        "of the smallest request"
        if get_us
        else ""
    )
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"metrics-{started:%Y%m%dT%H%M%SZ}.json"
    path.write_text(
        json.dumps(
            {
                "started": started.isoformat(),
                "rounds": rounds,
                "nodes": args.nodes,
                "loadavg": loadavg(),
                "recording_us": cost,
                "rows": rows,
            },
            indent=2,
        )
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
