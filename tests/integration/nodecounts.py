"""Counting the requests nodes serve, from their own metrics (test_control_ops, test_small_ops).

``tensorcache_node_requests_total{op, path}`` says which door served each
request; ``counted`` gives what a block of calls cost there, and
``quiet_cluster`` a module-scoped metrics-enabled cluster whose joins'
node-to-node traffic is over, so counts are the test's own.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tensorcache.apps.cluster import LocalCluster

from .helpers import poll
from .promtools import scrape


@contextlib.contextmanager
def quiet_cluster(log_dir: Path) -> Iterator[LocalCluster]:
    """3 nodes with metrics, once node-to-node traffic has stopped.

    Nodes that joined one after another hand keys over between them (gRPC
    gets, node to node): wait until that traffic is over, so the counts a
    test takes are its own requests only.
    """
    with LocalCluster(3, capacity="64MiB", log_dir=log_dir, metrics=True) as c:
        poll(lambda: _settled(c), timeout=60, what="node-to-node traffic to stop")
        yield c


def _settled(cluster: LocalCluster) -> bool:
    first = _requests(cluster)
    time.sleep(0.5)
    return _requests(cluster) == first


def _requests(cluster: LocalCluster) -> dict[tuple[str, str], float]:
    """Requests served by all nodes together, by (op, path), every status."""
    out: dict[tuple[str, str], float] = {}
    for proc in cluster.nodes.values():
        for family in text_string_to_metric_families(scrape(proc.metrics_address)):
            if family.name != "tensorcache_node_requests":
                continue
            for s in family.samples:
                key = (s.labels["op"], s.labels["path"])
                out[key] = out.get(key, 0) + s.value
    return out


def _stable_requests(cluster: LocalCluster) -> dict[tuple[str, str], float]:
    """``_requests`` once two scrapes 20 ms apart agree (bounded: 50 tries).

    A node records a request after sending its reply, so right after a call
    returns its count may not be in yet (seen under a loaded full suite).
    """
    last = _requests(cluster)
    for _ in range(50):
        time.sleep(0.02)
        now = _requests(cluster)
        if now == last:
            return now
        last = now
    return last


@contextlib.contextmanager
def counted(cluster: LocalCluster) -> Iterator[dict[tuple[str, str], float]]:
    """The requests served while the block ran (filled in at its end)."""
    before = _stable_requests(cluster)
    delta: dict[tuple[str, str], float] = {}
    yield delta
    after = _stable_requests(cluster)
    for key in set(before) | set(after):
        n = after.get(key, 0) - before.get(key, 0)
        if n:
            delta[key] = n
