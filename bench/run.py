"""``python -m bench``: tensorcache next to Arrow Flight, Redis, a raw socket and memcpy.

One run starts every system on 127.0.0.1 (a 3-node ``LocalCluster``, a
``redis-server``, a Flight server and the raw-socket server, each in its own
process), measures them with the same loops (bench/cases.py), prints one
table with each tensorcache row's ratio to every peer, checks the targets
of issue #4 (reported, never asserted) and writes
``bench/results/bench-<UTC>.json`` and ``.png``.

The exit status is non-zero only when a tensorcache case failed or read
back different bytes; a missing peer is skipped with a note.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import signal
import sys
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from bench import peers
from bench.cases import Plan, Runner, large_source
from bench.chart import write_png
from bench.measure import loadavg, mem_available, progress, reset_peak
from bench.report import (
    add_ratios,
    row_dicts,
    table,
    target_dicts,
    targets,
    targets_text,
    write_json,
)
from bench.systems import Flight, Redis, Socket, System, Tensorcache
from tensorcache.sizes import format_size, parse_size

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="tensorcache vs Arrow Flight, Redis, a raw socket and memcpy on loopback.",
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes and counts (CI smoke, <30 s)")
    p.add_argument("--sizes", default=None, help="comma-separated, e.g. 1MiB,64MiB,512MiB,2GiB")
    p.add_argument("--seconds-per-case", type=float, default=None, help="timed seconds per case")
    p.add_argument("--min-repeats", type=int, default=None)
    p.add_argument("--max-repeats", type=int, default=None)
    p.add_argument(
        "--max-case-seconds", type=float, default=None, help="no repetition starts after this"
    )
    p.add_argument("--no-flight", action="store_true", help="skip the Arrow Flight peer")
    p.add_argument("--no-redis", action="store_true", help="skip the Redis peer")
    p.add_argument("--no-socket", action="store_true", help="skip the raw-socket baseline")
    p.add_argument("--no-small", action="store_true", help="skip the 4 KiB cases")
    p.add_argument("--nodes", type=int, default=3, help="nodes of the local cluster (default 3)")
    p.add_argument(
        "--capacity",
        default=None,
        help="byte budget per node (default: 3GiB, or more when the largest size needs it)",
    )
    p.add_argument("--stripe-size", default=None, help="cluster stripe size (default 8MiB)")
    p.add_argument("--router", default=None, help="use this running cluster (host:port)")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="where JSON and PNG go")
    p.add_argument("--no-chart", action="store_true", help="write no PNG")
    return p.parse_args(argv)


def node_capacity(largest: int, nodes: int) -> int:
    """A node's budget: 3 GiB, or 1.5x its share of the largest tensor (stripes
    land by hash, so a node can hold more than 1/nodes of it)."""
    return max(3 * 1024**3, int(largest * 1.5) // max(nodes, 1))


def make_plan(args: argparse.Namespace) -> Plan:
    plan = Plan.quick() if args.quick else Plan()
    changes: dict[str, Any] = {}
    if args.sizes:
        changes["sizes"] = tuple(parse_size(s) for s in args.sizes.split(",") if s.strip())
    for name in ("seconds_per_case", "min_repeats", "max_repeats", "max_case_seconds"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    if "max_repeats" in changes and "min_repeats" not in changes:
        changes["min_repeats"] = min(plan.min_repeats, changes["max_repeats"])
    return replace(plan, **changes)


def has_local_fastpath() -> bool:
    """Whether this build's client can read co-located tensors without the network."""
    from tensorcache.client.api import ClientConfig

    return "local_fastpath" in ClientConfig.__dataclass_fields__


def _sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwind through every context manager that stops a child


def _start_peer(
    stack: contextlib.ExitStack, name: str, start: Any, log_dir: Path, notes: list[str]
) -> peers.Server | None:
    progress(f"starting {name}")
    try:
        return stack.enter_context(start(log_dir))  # type: ignore[no-any-return]
    except peers.PeerUnavailable as exc:
        why = str(exc)
    except (RuntimeError, OSError) as exc:  # it exists but would not start
        why = f"did not start: {str(exc).splitlines()[0]}"
    notes.append(f"{name} skipped: {why}")
    progress(f"{name} skipped: {why}")
    return None


def _warm_up(system: System) -> None:
    """One small round trip each way, so no case pays connection setup."""
    a = np.zeros(4096, np.uint8)
    system.prepare(4096)
    system.put("bench/warmup", a)
    system.get("bench/warmup", a.nbytes)
    system.delete("bench/warmup")
    system.finish(4096)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        plan = make_plan(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _sigterm)
    started = datetime.now(UTC)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    load_before = os.getloadavg()
    if load_before[0] > 0.5 * (os.cpu_count() or 1):
        progress(
            f"warning: load average {load_before[0]:.1f} on {os.cpu_count()} CPUs; other work "
            "on this machine lowers and scatters the numbers"
        )
    notes: list[str] = []
    versions: dict[str, str] = {"python": platform.python_version(), "numpy": np.__version__}
    runner = Runner(plan)
    fastpath = has_local_fastpath()
    if not reset_peak("self"):
        notes.append("peak RSS columns count from process start: /proc/*/clear_refs not writable")
    try:
        with contextlib.ExitStack() as stack:
            log_dir = stack.enter_context(peers.log_dir())
            node_pids: dict[str, int] = {}
            if args.router:
                router = args.router
            else:
                from tensorcache.apps.cluster import LocalCluster

                capacity = args.capacity or node_capacity(max(plan.sizes), args.nodes)
                progress(f"starting a local cluster: {args.nodes} nodes x {capacity}")
                kwargs: dict[str, Any] = {"capacity": capacity, "log_dir": log_dir / "tc"}
                if args.stripe_size:
                    kwargs["stripe_size"] = args.stripe_size
                cluster = stack.enter_context(LocalCluster(args.nodes, **kwargs))
                router = cluster.router_address
                node_pids = {name: p.pid for name, p in cluster.nodes.items()}
            servers = {
                name: _start_peer(stack, name, start, log_dir, notes)
                for name, start, skip in (
                    ("flight", peers.flight_server, args.no_flight),
                    ("redis", peers.redis_server, args.no_redis),
                    ("socket", peers.socket_server, args.no_socket),
                )
                if not skip
            }
            systems: list[System] = []

            def add(system: System) -> None:
                stack.callback(system.close)
                systems.append(system)

            tc_opts: dict[str, Any] = {"local_fastpath": False} if fastpath else {}
            if args.router and args.stripe_size:
                tc_opts["stripe_size"] = args.stripe_size
            add(Tensorcache("tensorcache", router, node_pids, **tc_opts))
            if fastpath:
                tc_opts.pop("local_fastpath")
                add(Tensorcache("tensorcache-colo", router, node_pids, **tc_opts))
            else:
                notes.append("no co-located row: ClientConfig has no local_fastpath in this build")
            makers = {"flight": Flight, "redis": Redis, "socket": Socket}
            for name, server in servers.items():
                if server is not None:
                    add(makers[name](server))
                    versions[name] = server.version
            for s in systems:
                _warm_up(s)
            stripe = systems[0].client.stripe_size  # type: ignore[attr-defined]

            for size in plan.sizes:
                progress(f"--- {format_size(size)}: generating the tensor")
                src, crc = large_source(size)
                runner.memcpy(src)
                for s in systems:
                    runner.large(s, src, crc)
                del src
            if not args.no_small:
                progress("--- 4 KiB tensors")
                for s in systems:
                    runner.small(s)
    except KeyboardInterrupt:
        print("interrupted; every server stopped", file=sys.stderr)
        return 130

    load_after = os.getloadavg()
    rows = runner.rows
    add_ratios(rows)
    goals = targets(rows)
    title = (
        f"tensorcache bench {started:%Y-%m-%d %H:%M}Z — {os.cpu_count()} CPUs, "
        f"load {load_before[0]:.1f} → {load_after[0]:.1f}" + (" — QUICK" if args.quick else "")
    )
    print(title)
    print(
        f"cluster: {'router ' + args.router if args.router else f'{args.nodes} local nodes'}, "
        f"stripe {format_size(stripe)}; loopback 127.0.0.1; GB/s = 1e9 B/s; "
        f"load average (1/5/15 min) before {'/'.join(f'{v:.1f}' for v in load_before)}, "
        f"after {'/'.join(f'{v:.1f}' for v in load_after)}"
    )
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(
        "ratios: x = how many times better tensorcache is (rates: tc ÷ peer; latency: peer ÷ tc);"
        " client Δpeak = peak RSS during the case - RSS before it"
    )
    for n in notes:
        print(f"note: {n}")
    print()
    print(table(rows, plan.small_batch))
    print()
    print(
        "highest peak RSS over all cases: "
        + ", ".join(f"{n} {kib / 1024:,.0f} MiB" for n, kib in runner.peaks.items())
    )
    print(targets_text(goals))
    for f in runner.failures:
        print(f"FAILED: {f}")

    json_path = args.out_dir / f"bench-{stamp}.json"
    png_path = (
        None
        if args.no_chart
        else write_png(args.out_dir / f"bench-{stamp}.png", rows, title, plan.small_batch)
    )
    write_json(
        json_path,
        {
            "benchmark": "bench",
            "started_utc": started.isoformat(),
            "quick": args.quick,
            "plan": asdict(plan),
            "host": {
                "cpus": os.cpu_count(),
                "machine": platform.machine(),
                "mem_available_end": mem_available(),
                "loadavg_before": load_before,
                "loadavg_after": load_after,
                "loadavg_end_1min": loadavg(),
                # False: /proc/<pid>/clear_refs refused, so "peak" columns are
                # peaks since process start rather than per case.
                "peak_reset_per_case": reset_peak("self"),
            },
            "versions": versions,
            "cluster": {"router": args.router, "nodes": sorted(node_pids), "stripe": stripe},
            "local_fastpath": fastpath,
            "notes": notes,
            "units": {"GB/s": "1e9 bytes/s", "us": "microseconds", "*_kib": "KiB"},
            "rows": row_dicts(rows),
            "targets": target_dicts(goals),
            "peak_rss_kib": runner.peaks,
            "failures": runner.failures,
        },
    )
    print(f"results: {json_path}" + (f" and {png_path}" if png_path else ""))
    tc_failed = any(f.startswith("tensorcache") for f in runner.failures)
    return 1 if tc_failed else 0
