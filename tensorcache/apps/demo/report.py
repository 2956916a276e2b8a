"""What the demo prints: the per-worker table, the cluster's counters, the summary."""

from __future__ import annotations

import os
import sys

from tensorcache.apps.demo.model import GiB, ModelFiles
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
        ("worker", "weights from", "tensors", "size", "load s", "GiB/s", "hits", "misses", "output")
    ]
    for r in results:
        if r.error is not None:
            rows.append((str(r.worker), r.role, "-", "-", "-", "-", "-", "-", "FAILED"))
            continue
        if r.filled:
            source = "disk (page cache evicted)" if r.evicted else "disk (page cache NOT evicted)"
        else:
            source = "cluster"
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
                "bit-identical" if r.output_ok else "DIFFERENT",
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


def summary(files: ModelFiles, disk: WorkerResult, cache: list[WorkerResult]) -> str:
    how = "page cache evicted first" if disk.evicted else "page cache could NOT be evicted"
    lines = [
        f"worker 0 read the checkpoint from disk ({how}) and filled the cluster: "
        f"{disk.seconds:.2f} s for {format_size(disk.nbytes)} "
        f"({_rate(disk.nbytes, disk.seconds):.2f} GiB/s, file read + puts)"
    ]
    good = [r for r in cache if r.error is None and r.seconds > 0]
    if not good:
        return "\n".join(lines)
    readers = who([r.worker for r in good])
    mean = sum(r.seconds for r in good) / len(good)
    span = max(r.finished for r in good) - min(r.started for r in good)
    together = _rate(sum(r.nbytes for r in good), span)
    lines.append(
        f"{readers} loaded the same weights from the cluster, {len(good)} at once: "
        f"{mean:.2f} s each on average ({disk.seconds / mean:.1f}x worker 0's disk load), "
        f"{together:.2f} GiB/s together; {os.cpu_count()} cores shared by router, nodes "
        "and workers"
    )
    everyone = [disk, *good]
    hits, misses = sum(r.hits for r in everyone), sum(r.misses for r in everyone)
    if hits + misses:
        lines.append(
            f"tensor hit rate {hits / (hits + misses):.1%} ({hits} from the cluster, "
            f"{misses} from the file); outputs bit-identical to the reference: "
            f"{sum(r.output_ok for r in everyone)} of {len(everyone)} workers"
        )
    return "\n".join(lines)
