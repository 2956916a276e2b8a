"""What the demo prints: the per-worker table, the cluster's counters, the summary."""

from __future__ import annotations

import os
import sys

from tensorcache.apps.demo.model import GiB, Model
from tensorcache.apps.demo.workers import WorkerResult
from tensorcache.apps.statview import stat_table
from tensorcache.client.api import connect
from tensorcache.errors import TensorCacheError
from tensorcache.sizes import format_size


def _rate(nbytes: float, seconds: float) -> float:
    return nbytes / seconds / GiB if seconds > 0 else 0.0


def who(ids: list[int]) -> str:
    return f"worker {ids[0]}" if len(ids) == 1 else f"workers {ids[0]}-{ids[-1]}"


def worker_table(results: list[WorkerResult]) -> str:
    rows = [
        ("worker", "source", "tensors", "size", "seconds", "GiB/s", "hits", "misses", "verified")
    ]
    for r in results:
        if r.error is not None:
            rows.append((str(r.worker), r.role, "-", "-", "-", "-", "-", "-", "FAILED"))
            continue
        source = "cache" if r.misses == 0 else "disk" if r.hits == 0 else "cache+disk"
        verified = f"{r.verified}/{r.tensors} OK" if r.ok else f"{r.verified}/{r.tensors} BAD"
        rows.append(
            (
                str(r.worker),
                source,
                str(r.tensors),
                format_size(r.nbytes),
                f"{r.seconds:.2f}",
                f"{_rate(r.nbytes, r.seconds):.2f}",
                str(r.hits),
                str(r.misses),
                verified,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def print_cluster(router: str, results: list[WorkerResult]) -> None:
    try:
        with connect(router) as client:
            stats = client.stats()
    except TensorCacheError as exc:
        print(f"\ncluster statistics unavailable: {exc}", file=sys.stderr)
        return
    print("\ncluster after the run (node counters count stripes and manifests as entries):")
    print(stat_table(stats))
    live = [s for s in stats if s.reachable]
    hits, misses = sum(s.hits for s in live), sum(s.misses for s in live)
    used, cap = sum(s.bytes_used for s in live), sum(s.capacity for s in live)
    evictions = sum(s.evictions for s in live)
    node_rate = hits / (hits + misses) if hits + misses else 0.0
    print(
        f"nodes: entry hit rate {node_rate:.1%} ({hits} hits, {misses} misses), "
        f"{evictions} evictions, space {format_size(used)} of {format_size(cap)} "
        f"({used / cap if cap else 0:.1%} used)"
    )
    good = [r for r in results if r.error is None]
    t_hits, t_misses = sum(r.hits for r in good), sum(r.misses for r in good)
    if t_hits + t_misses:
        hit_rate = t_hits / (t_hits + t_misses)
        print(
            f"workers: tensor hit rate {hit_rate:.1%} ({t_hits} hits, {t_misses} misses "
            "filled from disk)"
        )


def summary(model: Model, disk: WorkerResult, cache: list[WorkerResult]) -> str:
    disk_rate = _rate(disk.disk_bytes, disk.disk_seconds)
    fill_rate = _rate(disk.nbytes, disk.seconds)
    lines = [
        f"worker 0 read {format_size(disk.disk_bytes)} from disk in {disk.disk_seconds:.2f} s "
        f"({disk_rate:.2f} GiB/s inside np.load; the files are likely in the OS page cache, "
        "so this is the best case for disk) and filled the cache: "
        f"{disk.seconds:.2f} s in all ({fill_rate:.2f} GiB/s)"
    ]
    good = [r for r in cache if r.error is None and r.seconds > 0]
    if not good:
        return "\n".join(lines)
    ids = [r.worker for r in good]
    readers = who(ids)
    per_worker = sum(_rate(r.nbytes, r.seconds) for r in good) / len(good)
    span = max(r.finished for r in good) - min(r.started for r in good)
    together = _rate(sum(r.nbytes for r in good), span)
    # Compare what the cluster delivered (all readers at once) with what one
    # reader got from the page-cached file alone: per-worker figures would
    # charge the cache for N workers sharing this machine's few cores.
    if together >= disk_rate:
        verdict = f"{together / disk_rate:.1f}x the disk rate" if disk_rate else "faster"
    else:
        verdict = (
            f"{disk_rate / together:.1f}x slower than page-cached disk on this "
            f"{os.cpu_count()}-core machine, where router, nodes and workers share the cores"
        )
    c_hits, c_misses = sum(r.hits for r in good), sum(r.misses for r in good)
    source = (
        "from the cache"
        if c_misses == 0
        else f"through the cache ({c_hits} hits, {c_misses} misses read through from disk)"
    )
    lines.append(
        f"{readers} loaded {format_size(model.nbytes)} each {source}, {len(good)} at once: "
        f"{together:.2f} GiB/s together ({per_worker:.2f} GiB/s each) vs {disk_rate:.2f} GiB/s "
        f"for one reader of the file ({verdict}; {os.cpu_count()} cores shared by all processes)"
    )
    everyone = [disk, *good]
    hits, misses = sum(r.hits for r in everyone), sum(r.misses for r in everyone)
    if hits and misses:
        # The design documents' metric: hit time x hit rate + miss time x miss rate.
        t_hit = sum(r.get_seconds for r in everyone) / hits
        t_miss = sum(r.fill_seconds for r in everyone) / misses
        h = hits / (hits + misses)
        lines.append(
            f"average access time per tensor: {t_hit * 1e3:.1f} ms per hit (get), "
            f"{t_miss * 1e3:.1f} ms per miss (load + put) -> "
            f"{1e3 * (h * t_hit + (1 - h) * t_miss):.1f} ms at a {h:.1%} hit rate"
        )
    return "\n".join(lines)
