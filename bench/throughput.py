"""Throughput benchmark: put/get GB/s by tensor size, small-tensor items/s, memory.

Run from the repository root::

    .venv/bin/python -m bench.throughput                 # full run (a few minutes)
    .venv/bin/python -m bench.throughput --quick         # smoke run (seconds)
    .venv/bin/python -m bench.throughput --router HOST:PORT   # an already-running cluster

It starts a local cluster (``LocalCluster``) unless ``--router`` is given,
prints one table and writes the same results as JSON under bench/results/.
GB/s is 10**9 bytes per second; sizes are binary (MiB, GiB). Each case is
repeated until its time budget is spent (between a minimum and a maximum
number of repetitions) and reports the median and the best repetition.
Work that is not the measured operation (deleting the key before a put,
dropping the previous result before a get, checking the data) runs outside
the timed region. A get's time includes allocating and first-touching the
result array, as a caller of ``Client.get`` pays it.

This is a benchmark, not a test: nothing here asserts on timings. The exit
status is non-zero only when a tensor read back differs from what was put.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import os
import platform
import resource
import signal
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

import tensorcache
from tensorcache.cluster import LocalCluster
from tensorcache.sizes import format_size, parse_size

RESULTS_DIR = Path(__file__).resolve().parent / "results"
GB = 1e9
MIB = 1024 * 1024
SMALL = 4096  # bytes of one "small" tensor


@dataclass(frozen=True)
class Plan:
    """What to run; the defaults are the full run, ``quick()`` the smoke run."""

    sizes: tuple[int, ...] = (MIB, 64 * MIB, 512 * MIB, 2048 * MIB)
    seconds_per_case: float = 4.0
    min_repeats: int = 3
    max_repeats: int = 50
    small_batch: int = 1000
    single_gets_per_rep: int = 200
    memcpy_bytes: int = 512 * MIB

    @classmethod
    def quick(cls) -> Plan:
        return cls(
            sizes=(64 * 1024, MIB, 16 * MIB),
            seconds_per_case=0.2,
            min_repeats=1,
            max_repeats=5,
            small_batch=100,
            single_gets_per_rep=50,
            memcpy_bytes=16 * MIB,
        )


@dataclass
class Row:
    """One line of the table (and one record of the JSON)."""

    case: str
    size: int
    op: str
    unit: str  # "GB/s" or "items/s"
    median: float
    best: float
    repeats: int
    seconds: list[float] = field(default_factory=list)
    vs_memcpy: float | None = None  # median / memcpy median, for GB/s rows
    verified: bool | None = None
    client_rss_kib: int | None = None  # current, right after the case
    client_peak_kib: int | None = None  # ru_maxrss so far
    node_rss_kib: dict[str, int] | None = None  # current, right after the case


# ---------------------------------------------------------------- memory probes
def _proc_status_kib(pid: int | str, field_name: str) -> int | None:
    """A ``VmRSS``/``VmHWM``-style field of /proc/<pid>/status, in KiB (None if unreadable)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def client_peak_kib() -> int:
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak


def nodes_kib(pids: dict[str, int], field_name: str) -> dict[str, int]:
    out = {}
    for name, pid in pids.items():
        kib = _proc_status_kib(pid, field_name)
        if kib is not None:
            out[name] = kib
    return out


# ---------------------------------------------------------------- timing
def measure(
    fn: Callable[[], object],
    plan: Plan,
    setup: Callable[[], object] | None = None,
    budget: float | None = None,
) -> list[float]:
    """Time ``fn`` repeatedly (``setup`` before each, untimed) within the budget."""
    budget = plan.seconds_per_case if budget is None else budget
    times: list[float] = []
    spent = 0.0
    while len(times) < plan.max_repeats and (len(times) < plan.min_repeats or spent < budget):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        times.append(dt)
        spent += dt
    return times


def rates(work: float, times: list[float]) -> tuple[float, float]:
    """(median, best) of work/second over the repetitions."""
    per = [work / t for t in times]
    return statistics.median(per), max(per)


def random_array(nbytes: int, seed: int) -> np.ndarray:
    """Incompressible-looking uint8 data, generated once per size."""
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)


def same_bytes(a: np.ndarray, b: np.ndarray, step: int = 64 * MIB) -> bool:
    """a == b, compared in slices so no multi-GiB temporary is made."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    fa, fb = a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8)
    return all(np.array_equal(fa[i : i + step], fb[i : i + step]) for i in range(0, fa.size, step))


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- cases
class Bench:
    def __init__(self, client: Any, plan: Plan, node_pids: dict[str, int]) -> None:
        self.client = client
        self.plan = plan
        self.node_pids = node_pids
        self.rows: list[Row] = []
        self.memcpy_median: float | None = None

    def _add(self, row: Row, *, nodes_now: bool = True) -> Row:
        row.client_rss_kib = _proc_status_kib("self", "VmRSS")
        row.client_peak_kib = client_peak_kib()
        if nodes_now and self.node_pids:
            row.node_rss_kib = nodes_kib(self.node_pids, "VmRSS")
        self.rows.append(row)
        median = f"{row.median:,.3f}" if row.unit == "GB/s" else f"{row.median:,.0f}"
        progress(
            f"{row.case:<8} {format_size(row.size):>10} {row.op:<10} "
            f"{median} {row.unit} median over {row.repeats}"
        )
        return row

    def memcpy(self) -> None:
        n = self.plan.memcpy_bytes
        src = random_array(n, seed=1)
        dst = np.ones(n, np.uint8)  # allocated and touched before timing
        times = measure(functools.partial(np.copyto, dst, src), self.plan, budget=2.0)
        median, best = rates(n / GB, times)
        self.memcpy_median = median
        self._add(Row("memcpy", n, "np.copyto", "GB/s", median, best, len(times), times))
        del src, dst

    def warm_up(self) -> None:
        """Open every node channel once so no case pays connection setup."""
        keys = [f"bench/warmup/{i}" for i in range(64)]
        block = np.zeros((len(keys), SMALL), np.uint8)
        self.client.put_many({k: block[i] for i, k in enumerate(keys)})
        self.client.get_many(keys)
        for k in keys:
            self.client.delete(k)

    def large(self, nbytes: int) -> bool:
        """put and get of one tensor of ``nbytes``; returns whether it read back intact."""
        c = self.client
        key = f"bench/large/{nbytes}"
        src = random_array(nbytes, seed=nbytes)
        c.delete(key)

        times = measure(
            functools.partial(c.put, key, src), self.plan, setup=functools.partial(c.delete, key)
        )
        median, best = rates(nbytes / GB, times)
        self._add(Row("tensor", nbytes, "put", "GB/s", median, best, len(times), times))

        holder: list[np.ndarray | None] = [None]

        def drop() -> None:
            holder[0] = None

        def get() -> None:
            holder[0] = c.get(key)

        times = measure(get, self.plan, setup=drop)
        got = holder[0]
        ok = got is not None and same_bytes(got, src)  # untimed, once per size
        median, best = rates(nbytes / GB, times)
        row = Row("tensor", nbytes, "get", "GB/s", median, best, len(times), times, verified=ok)
        if self.memcpy_median:
            row.vs_memcpy = median / self.memcpy_median
        self._add(row)  # node and client RSS right after the get, result still held
        if not ok:
            progress(f"ERROR: get of {format_size(nbytes)} did not return what was put")

        # Free everything before the next size: result, source, cache entry.
        holder[0] = got = None
        del src
        c.delete(key)
        gc.collect()
        return ok

    def small(self) -> bool:
        """4 KiB tensors: put_many and get_many in batches, and single-key gets."""
        c, n = self.client, self.plan.small_batch
        keys = [f"bench/small/{i:06d}" for i in range(n)]
        block = random_array(n * SMALL, seed=SMALL).reshape(n, SMALL)
        values = {k: block[i] for i, k in enumerate(keys)}  # row views, no copies

        c.put_many(values)  # untimed first pass: entries exist, later puts replace
        times = measure(lambda: c.put_many(values), self.plan)
        median, best = rates(n, times)
        self._add(Row("small", SMALL, f"put_many/{n}", "items/s", median, best, len(times), times))

        holder: list[dict[str, np.ndarray | None]] = [{}]

        def get_many() -> None:
            holder[0] = c.get_many(keys)

        times = measure(get_many, self.plan)
        got = holder[0]
        ok = all(
            (a := got.get(k)) is not None and np.array_equal(a, block[i])
            for i, k in enumerate(keys)
        )
        median, best = rates(n, times)
        row = Row("small", SMALL, f"get_many/{n}", "items/s", median, best, len(times), times)
        row.verified = ok
        self._add(row)
        holder[0] = {}

        m = min(self.plan.single_gets_per_rep, n)

        def singles() -> None:
            for k in keys[:m]:
                c.get(k)

        times = measure(singles, self.plan)
        median, best = rates(m, times)
        self._add(Row("small", SMALL, "get", "ops/s", median, best, len(times), times))

        for k in keys:
            c.delete(k)
        if not ok:
            progress("ERROR: get_many of 4 KiB tensors did not return what was put")
        return ok


# ---------------------------------------------------------------- output
def _mib(kib: int | None) -> str:
    return "-" if kib is None else f"{kib / 1024:,.0f}"


def table(rows: list[Row], node_names: list[str]) -> str:
    head = [
        "case", "size", "op", "unit", "median", "best", "reps", "vs memcpy", "ok",
        "client RSS MiB", "client peak MiB", "node RSS MiB (" + ",".join(node_names) + ")",
    ]  # fmt: skip
    lines = [head]
    for r in rows:
        fmt = "{:,.3f}" if r.unit == "GB/s" else "{:,.0f}"
        nodes = "/".join(_mib(r.node_rss_kib.get(n)) for n in node_names) if r.node_rss_kib else "-"
        lines.append(
            [
                r.case,
                format_size(r.size),
                r.op,
                r.unit,
                fmt.format(r.median),
                fmt.format(r.best),
                str(r.repeats),
                "-" if r.vs_memcpy is None else f"{r.vs_memcpy:.2f}x",
                "-" if r.verified is None else ("yes" if r.verified else "NO"),
                _mib(r.client_rss_kib),
                _mib(r.client_peak_kib),
                nodes,
            ]
        )
    right = {4, 5, 6, 7, 9, 10}
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = []
    for j, line in enumerate(lines):
        cells = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        ]
        out.append("  ".join(cells).rstrip())
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def write_json(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)


# ---------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.throughput",
        description="Put/get throughput of tensorcache by tensor size, plus 4 KiB items/s.",
    )
    p.add_argument("--sizes", default=None, help="comma-separated, e.g. 1MiB,64MiB,512MiB,2GiB")
    p.add_argument("--quick", action="store_true", help="tiny sizes and counts (CI smoke)")
    p.add_argument("--nodes", type=int, default=3, help="nodes of the local cluster (default 3)")
    p.add_argument("--capacity", default="3GiB", help="byte budget per node (default 3GiB)")
    p.add_argument(
        "--stripe-size", default=None, help="stripe size (default: the cluster's, 8MiB locally)"
    )
    p.add_argument("--seconds-per-case", type=float, default=None, help="time budget per case")
    p.add_argument("--min-repeats", type=int, default=None)
    p.add_argument("--max-repeats", type=int, default=None)
    p.add_argument("--router", default=None, help="benchmark this running cluster (host:port)")
    p.add_argument("--no-small", action="store_true", help="skip the 4 KiB cases")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/)")
    return p.parse_args(argv)


def make_plan(args: argparse.Namespace) -> Plan:
    plan = Plan.quick() if args.quick else Plan()
    changes: dict[str, Any] = {}
    if args.sizes:
        changes["sizes"] = tuple(parse_size(s) for s in args.sizes.split(",") if s.strip())
    for name in ("seconds_per_case", "min_repeats", "max_repeats"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    plan = Plan(**{**asdict(plan), **changes})
    if any(s <= 0 for s in plan.sizes) or plan.min_repeats < 1 or plan.max_repeats < 1:
        raise ValueError("sizes must be > 0 bytes and repeats >= 1")
    return plan


@contextlib.contextmanager
def cluster_or_router(args: argparse.Namespace) -> Iterator[tuple[str, dict[str, int]]]:
    """Yield (router address, node pids); a started cluster is stopped on any exit."""
    if args.router:
        yield args.router, {}
        return
    kwargs: dict[str, Any] = {"capacity": args.capacity}
    if args.stripe_size:
        kwargs["stripe_size"] = args.stripe_size
    progress(f"starting a local cluster: {args.nodes} nodes x {args.capacity}")
    with LocalCluster(args.nodes, **kwargs) as cluster:
        yield cluster.router_address, {name: p.pid for name, p in cluster.nodes.items()}
    progress("cluster stopped")


def _sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwind through the finally blocks that stop the cluster


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        plan = make_plan(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _sigterm)
    started = datetime.now(UTC)
    load_before = os.getloadavg()
    if load_before[0] > 0.5 * (os.cpu_count() or 1):
        progress(
            f"warning: load average is {load_before[0]:.1f} on {os.cpu_count()} CPUs; "
            "other work on this machine will lower and scatter the numbers"
        )
    out_path = args.out or RESULTS_DIR / f"throughput-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    ok = True
    try:
        with cluster_or_router(args) as (router, node_pids):
            connect_opts = {"stripe_size": args.stripe_size} if args.router else {}
            with tensorcache.connect(router, **connect_opts) as client:
                bench = Bench(client, plan, node_pids)
                bench.memcpy()
                bench.warm_up()
                for size in plan.sizes:
                    ok = bench.large(size) and ok
                if not args.no_small:
                    ok = bench.small() and ok
                stripe = client.stripe_size
            # Lifetime peaks, read while the nodes are still running.
            node_hwm = nodes_kib(node_pids, "VmHWM")
            client_hwm = client_peak_kib()
    except KeyboardInterrupt:
        print("interrupted; cluster stopped", file=sys.stderr)
        return 130

    load_after = os.getloadavg()
    names = sorted(node_pids)
    print(
        f"tensorcache throughput  {started:%Y-%m-%d %H:%M:%SZ}  router={router}  "
        f"nodes={len(names) or '?'}  stripe={format_size(stripe)}  GB/s = 1e9 B/s"
    )
    print(
        f"host: {os.cpu_count()} CPUs, load average {load_before[0]:.1f} before, "
        f"{load_after[0]:.1f} after (1 min; includes this benchmark)"
    )
    print(table(bench.rows, names))
    print(
        f"peak RSS (lifetime): client {_mib(client_hwm)} MiB; nodes "
        + (", ".join(f"{n} {_mib(node_hwm.get(n))} MiB" for n in names) or "n/a (--router)")
    )
    doc = {
        "benchmark": "throughput",
        "started_utc": started.isoformat(),
        "router": router,
        "started_cluster": not args.router,
        "nodes": names,
        "capacity_per_node": None if args.router else parse_size(args.capacity),
        "stripe_size": stripe,
        "plan": asdict(plan),
        "host": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "loadavg_before": load_before,
            "loadavg_after": load_after,
        },
        "units": {"GB/s": "1e9 bytes/s", "rss": "KiB"},
        "memcpy_gbps_median": bench.memcpy_median,
        "rows": [asdict(r) for r in bench.rows],
        "peak_rss_kib": {"client": client_hwm, "nodes": node_hwm},
        "verified": ok,
    }
    write_json(out_path, doc)
    print(f"results: {out_path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
