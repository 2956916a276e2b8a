"""The ``tensorcache`` command: up, node, router, stat, load, demo."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from tensorcache.apps import logformat
from tensorcache.apps.statview import router_status_line, stat_table


def _cmd_up(args: argparse.Namespace) -> int:
    from tensorcache.apps.cluster import LocalCluster

    cluster = LocalCluster(
        args.nodes,
        capacity=args.capacity,
        policy=args.policy,
        port=args.port,
        stripe_size=args.stripe_size,
        log_dir=args.log_dir,
        etcd=args.etcd,
        replicas=args.replicas,
        disk_path=args.disk_path,
        disk_capacity=args.disk_capacity,
        pinned_capacity=args.pinned_capacity,
        metrics=False if args.metrics_port < 0 else args.metrics_port,
        router_args=["--log-format", args.log_format],
        node_args=["--log-format", args.log_format],
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    cluster.start()
    try:
        print(f"tensorcache cluster up: router {cluster.router_address}", flush=True)
        if cluster.router is not None and cluster.router.metrics_address:
            print(f"  metrics    router {cluster.router.metrics_address}", flush=True)
        for name, proc in cluster.nodes.items():
            metrics = f"  metrics {proc.metrics_address}" if proc.metrics_address else ""
            print(f"  {name:<10} {proc.address:<22} pid {proc.pid}{metrics}", flush=True)
        print(f"logs in {cluster.log_dir}; Ctrl-C stops every process", flush=True)
        print(f"membership {cluster.membership}; replicas {cluster.replicas}", flush=True)
        while not stop.wait(0.5):
            dead = [n for n, p in cluster.nodes.items() if not p.alive()]
            if cluster.router is not None and not cluster.router.alive():
                print("router exited; stopping the cluster", file=sys.stderr)
                return 1
            for name in dead:
                print(f"{name} exited with {cluster.nodes[name].popen.returncode}", file=sys.stderr)
                cluster.nodes.pop(name)
    finally:
        cluster.stop()
        print("tensorcache cluster stopped", flush=True)
    return 0


def _cmd_stat(args: argparse.Namespace) -> int:
    from tensorcache.client.api import connect

    if args.json or args.watch:
        from tensorcache.apps import statwatch

        with connect(args.router, timeout_s=args.timeout) as c:
            if args.json:
                status = statwatch.router_status(args.router, args.timeout)
                print(statwatch.as_json(status, c.epoch, c.stats()))
                return 0
            return statwatch.watch(
                args.router,
                c.stats,
                interval_s=args.interval,
                count=args.count,
                timeout_s=args.timeout,
            )
    print(router_status_line(args.router, args.timeout))
    with connect(args.router, timeout_s=args.timeout) as c:
        stats = c.stats()
        print(f"router {args.router}  epoch {c.epoch}  nodes {len(stats)}")
        print(stat_table(stats))
    return 0


def _cmd_node(args: argparse.Namespace) -> int:
    from tensorcache.node import server

    return server.run(args)


def _cmd_router(args: argparse.Namespace) -> int:
    from tensorcache.router import server

    return server.run(args)


def _cmd_load(args: argparse.Namespace) -> int:
    from tensorcache.apps import loadcmd

    return loadcmd.run(args)


def _cmd_demo(args: argparse.Namespace) -> int:
    from tensorcache.apps.demo import main as demo

    return demo.run(args)


def build_parser() -> argparse.ArgumentParser:
    from tensorcache.node import server as node_server
    from tensorcache.router import server as router_server

    parser = argparse.ArgumentParser(prog="tensorcache", description="A distributed tensor cache.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run a local cluster (router + N nodes) in the foreground")
    up.add_argument("--nodes", type=int, default=3, help="number of nodes (default 3)")
    up.add_argument("--capacity", default="1GiB", help="byte budget per node (default 1GiB)")
    up.add_argument("--policy", default="lru", choices=["lru", "lfu", "fifo"])
    up.add_argument(
        "--pinned-capacity",
        default=None,
        help="bytes per node that pinned entries may hold (default: half of --capacity)",
    )
    up.add_argument("--port", type=int, default=7070, help="router port (default 7070)")
    up.add_argument("--stripe-size", default="8MiB", help="stripe tensors above (default 8MiB)")
    up.add_argument("--log-dir", default=None, help="keep process logs here")
    up.add_argument(
        "--replicas", type=int, default=1, help="copies of each entry on distinct nodes (default 1)"
    )
    up.add_argument(
        "--metrics-port",
        type=int,
        default=-1,
        help="serve Prometheus metrics: the router on PORT, node i on PORT+1+i "
        "(0: free ports, printed; default -1: off)",
    )
    up.add_argument(
        "--etcd",
        default="auto",
        help="membership store: auto (a private etcd if installed, else embedded; default), "
        "an etcd URL, or none (embedded in the router)",
    )
    up.add_argument(
        "--disk-path",
        default=None,
        help="a disk tier per node under DIR/<node name> (entries evicted from RAM go there)",
    )
    up.add_argument("--disk-capacity", default=None, help="disk tier budget per node (e.g. 10GiB)")
    up.set_defaults(fn=_cmd_up)

    node = sub.add_parser("node", help="run one cache node")
    node_server.add_arguments(node)
    node.set_defaults(fn=_cmd_node)

    router = sub.add_parser("router", help="run the router")
    router_server.add_arguments(router)
    router.set_defaults(fn=_cmd_router)
    for p in (up, node, router):
        p.add_argument(
            "--log-format",
            choices=logformat.FORMATS,
            default="text",
            help="text (default) or json: one JSON object per line (ts, level, logger, msg, pid)",
        )

    stat = sub.add_parser("stat", help="print per-node statistics")
    stat.add_argument("--router", default="127.0.0.1:7070", help="router host:port")
    stat.add_argument("--timeout", type=float, default=10.0, help="seconds")
    stat.add_argument("--json", action="store_true", help="print one JSON object, for scripts")
    stat.add_argument(
        "--watch", action="store_true", help="a live view, redrawn in place (Ctrl-C stops)"
    )
    stat.add_argument(
        "--interval", type=float, default=2.0, help="seconds between refreshes (default 2)"
    )
    stat.add_argument(
        "--count", type=int, default=None, help="stop --watch after this many refreshes"
    )
    stat.set_defaults(fn=_cmd_stat)

    from tensorcache.apps import loadcmd

    load = sub.add_parser("load", help="stream a safetensors checkpoint into the cluster")
    loadcmd.add_arguments(load)
    load.set_defaults(fn=_cmd_load)

    from tensorcache.apps import warm

    warm.add_arguments(sub)

    from tensorcache.apps import etcdrestore

    etcdrestore.add_arguments(sub)

    demo = sub.add_parser("demo", help="share a model's weights between worker processes")
    demo.add_argument("--workers", type=int, default=4, help="worker processes (default 4)")
    demo.add_argument("--model-mb", type=int, default=128, help="model size in MB (default 128)")
    demo.add_argument("--nodes", type=int, default=3)
    demo.add_argument("--dir", default=".demo", help="where the model file lives")
    demo.set_defaults(fn=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logformat.configure(
        logging.INFO if args.verbose or args.command in ("node", "router") else logging.WARNING,
        getattr(args, "log_format", "text"),
    )
    from tensorcache.errors import TensorCacheError

    try:
        return int(args.fn(args) or 0)
    except (TensorCacheError, ValueError, TimeoutError, RuntimeError) as exc:
        print(f"tensorcache {args.command}: {exc}", file=sys.stderr)
        return 2
