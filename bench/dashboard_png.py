"""``python -m bench.dashboard_png``: docs/dashboard.png, drawn from real data.

A 3-node local cluster with ``--metrics-port`` (nodes of 64 MiB, so they
fill and evict) runs a workload in phases for a couple of minutes; a private
Prometheus scrapes it every second. Then six of the dashboard's queries
(k8s/monitoring/dashboard.json, the same PromQL) are read back with
``query_range`` and drawn with matplotlib, one panel each, as Grafana would
show them. The phases, so that each panel moves: (1) writing weights
(puts of 1 MiB tensors, hits on re-reads), (2) readers only, (3) a working
set larger than the cluster (puts of fresh keys: evictions, hit rate falls),
(4) readers again. Every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

import tensorcache
from tensorcache.apps.cluster import LocalCluster
from tensorcache.apps.promserver import find_prometheus, start_prometheus

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "k8s" / "monitoring" / "dashboard.json"
OUT = ROOT / "docs" / "dashboard.png"
WINDOW = "10s"  # $__rate_interval at a 1 s scrape interval

# (dashboard panel title, legend of the query within it) -> drawn in this order
PANELS = [
    ("Hit rate per node", None, "hit rate", "percent"),
    ("Access time p50 / p99", None, "access time", "seconds"),
    ("Utilization per node", None, "utilization (stored / capacity)", "percent"),
    ("Evictions per node", None, "evictions / s", "plain"),
    ("Bytes in / out", None, "payload bytes / s", "bytes"),
    ("Requests per node", None, "requests / s", "plain"),
]


def queries() -> dict[str, list[tuple[str, str]]]:
    dash = json.loads(DASHBOARD.read_text())
    return {
        p["title"]: [(t["expr"], t.get("legendFormat", "")) for t in p["targets"]]
        for p in dash["panels"]
        if p["type"] != "row"
    }


def workload(router: str, phase_s: float, stop: threading.Event, log: list[str]) -> None:
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal(256 * 1024).astype(np.float32) for _ in range(24)]  # 1 MiB
    with tensorcache.connect(router, retries=2) as c:

        def until(t_end: float, fn: Any) -> None:
            i = 0
            while time.monotonic() < t_end and not stop.is_set() and i < 1_000_000:
                try:
                    fn(i)
                except tensorcache.TensorCacheError as exc:
                    log.append(repr(exc))
                i += 1

        t = time.monotonic()
        log.append(f"{time.time():.0f} phase 1: write the weights, re-read them")
        until(
            t + phase_s,
            lambda i: c.put(f"w/{i % 24}", weights[i % 24]) if i < 48 else c.get(f"w/{i % 24}"),
        )
        log.append(f"{time.time():.0f} phase 2: readers")
        until(t + 2 * phase_s, lambda i: c.get(f"w/{i % 24}") if i % 10 else c.get(f"absent/{i}"))
        log.append(f"{time.time():.0f} phase 3: a working set larger than the cluster")
        until(
            t + 3 * phase_s,
            lambda i: c.put(f"kv/{i}", weights[i % 24]) if i % 2 else c.get(f"kv/{i - 61}"),
        )
        log.append(f"{time.time():.0f} phase 4: readers again")

        def read_or_rewrite(i: int) -> None:
            if c.get(f"w/{i % 24}") is None:  # evicted in phase 3: the loader puts it back
                c.put(f"w/{i % 24}", weights[i % 24])

        until(t + 4 * phase_s, read_or_rewrite)


def draw(
    series: dict[str, list[tuple[str, list[tuple[float, float]]]]], t0: float, out: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, PercentFormatter

    fig, axes = plt.subplots(2, 3, figsize=(13.5, 6.4), dpi=80)
    fig.patch.set_facecolor("#181b1f")
    for ax, (title, _, ylabel, kind) in zip(axes.flat, PANELS, strict=True):
        ax.set_facecolor("#111217")
        for spine in ax.spines.values():
            spine.set_color("#444")
        ax.tick_params(colors="#ccc", labelsize=8)
        ax.set_title(title, color="#eee", fontsize=10, loc="left")
        ax.set_ylabel(ylabel, color="#aaa", fontsize=8)
        ax.grid(color="#333", linewidth=0.5)
        for legend, points in series[title]:
            if points:
                xs = [p[0] - t0 for p in points]
                ax.plot(xs, [p[1] for p in points], linewidth=1.2, label=legend)
        if kind == "percent":
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
            ax.set_ylim(0, 1.05)
        elif kind == "seconds":
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(
                FuncFormatter(lambda v, _: f"{v * 1e3:g} ms" if v >= 1e-3 else f"{v * 1e6:g} µs")
            )
        elif kind == "bytes":
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1e6:g} MB"))
        ax.set_xlabel("seconds", color="#aaa", fontsize=8)
        ax.legend(fontsize=6.5, facecolor="#222", edgecolor="#444", labelcolor="#ddd", loc="best")
    fig.suptitle(
        "tensorcache dashboard (k8s/monitoring/dashboard.json), real Prometheus data: "
        "3 local nodes of 64 MiB under a phased load",
        color="#eee",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(out, facecolor=fig.get_facecolor())
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--phase-seconds", type=float, default=30.0)
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    binary = find_prometheus()
    if binary is None:
        p.error("needs Debian's prometheus package (apt-get install prometheus)")
    wanted = queries()
    with (
        tempfile.TemporaryDirectory(prefix="tc-dash-") as tmp,
        LocalCluster(3, capacity="64MiB", metrics=True, log_dir=Path(tmp) / "cluster") as cluster,
    ):
        assert cluster.router is not None
        jobs = {
            "tensorcache-router": [cluster.router.metrics_address],
            "tensorcache-node": [n.metrics_address for n in cluster.nodes.values()],
        }
        prom = start_prometheus(binary, Path(tmp) / "prometheus", jobs, interval_s=1.0)
        try:
            stop = threading.Event()
            log: list[str] = []
            start = time.time()
            worker = threading.Thread(
                target=workload, args=(cluster.router_address, args.phase_seconds, stop, log)
            )
            worker.start()
            worker.join(timeout=4 * args.phase_seconds + 120)
            stop.set()
            time.sleep(2)  # the last scrapes
            end = time.time()
            series: dict[str, list[tuple[str, list[tuple[float, float]]]]] = {}
            for title, _, _, _ in PANELS:
                drawn = []
                for expr, legend in wanted[title]:
                    result = prom.query_range(
                        expr.replace("$__rate_interval", WINDOW), start, end, 1.0
                    )
                    for r in result:
                        name = legend
                        for k, v in r["metric"].items():
                            name = name.replace("{{" + k + "}}", v)
                        points = [
                            (float(ts), float(v))
                            for ts, v in r["values"]
                            if v not in ("NaN", "+Inf", "-Inf")
                        ]
                        drawn.append((name or expr[:30], points))
                series[title] = drawn
        finally:
            prom.stop()
    out = Path(args.out)
    draw(series, start, out)
    print("\n".join(log[:20]))
    print(f"wrote {out} ({out.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
