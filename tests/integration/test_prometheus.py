"""A real Prometheus scrapes a real cluster: every dashboard query and alert has data.

The cluster (router on a private etcd, 3 nodes of 8 MiB, ``--metrics-port 0``)
runs a bounded load that exercises every figure the dashboard shows: puts
that evict (small nodes), gets that hit and, twice as often, miss,
and puts too large for any node (refused: the errors panel). Prometheus
(on 127.0.0.1, a free port, a temporary data directory, scraping every
0.5 s, the alert rules loaded) must then answer every dashboard query with
at least one finite value, and every alert's expression with data once its
condition holds: the load itself makes the hit rate collapse, the nodes
evict in a storm and sit near capacity; then a node is killed (node down)
and etcd is stopped (etcd unreachable).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import tensorcache
from tensorcache.apps.cluster import LocalCluster

from .promtools import PromServer, alert_expressions, dashboard_queries, rule_file, start_prometheus

pytestmark = pytest.mark.integration

RATE_WINDOW = "10s"  # Grafana's $__rate_interval, for a 0.5 s scrape interval
DEADLINE_S = 90.0  # to wait for any one query to have data
ENTRY = np.arange(16 * 1024, dtype=np.float32)  # 64 KiB: ~120 fit in a node of 8 MiB
BATCH = 8
TOO_BIG = np.zeros(9 * 1024 * 1024, np.uint8)  # more than any node holds


class Load:
    """A background workload, bounded in time and iterations; counts what it did."""

    def __init__(self, router: str, max_s: float = 300.0, max_iterations: int = 200_000) -> None:
        self.router = router
        self.max_s = max_s
        self.max_iterations = max_iterations
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.done = {"puts": 0, "refused": 0, "hits": 0, "misses": 0, "failed": 0}
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self._thread.join(timeout=60)

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_s
        # No striping: a value larger than a node is refused by that node.
        with tensorcache.connect(self.router, stripe_size="64MiB", retries=1) as c:
            for i in range(self.max_iterations):
                if self.stop.is_set() or time.monotonic() > deadline:
                    return
                try:
                    # A batch of 8 entries per call: the nodes evict (and store)
                    # many entries per second even on a loaded machine.
                    c.put_many({f"load/{i}/{j}": ENTRY for j in range(BATCH)})
                    self.done["puts"] += BATCH
                    got = c.get_many([f"load/{i}/0", f"absent/{i}/0", f"absent/{i}/1"])
                    for value in got.values():
                        self.done["hits" if value is not None else "misses"] += 1
                    if i % 25 == 0:
                        try:
                            c.put(f"big/{i}", TOO_BIG)
                        except tensorcache.CapacityExceeded:
                            self.done["refused"] += 1
                except tensorcache.TensorCacheError as exc:  # a node killed on purpose
                    self.done["failed"] += 1
                    self.errors.append(repr(exc))
                    time.sleep(0.05)


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory, etcd_binary: str) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("prometheus")
    with LocalCluster(
        3, capacity="8MiB", etcd="auto", metrics=True, log_dir=tmp / "cluster"
    ) as cluster:
        assert cluster.router is not None and cluster.etcd_url
        jobs = {
            "tensorcache-router": [cluster.router.metrics_address],
            "tensorcache-node": [p.metrics_address for p in cluster.nodes.values()],
        }
        prom = start_prometheus(tmp, jobs, rules=rule_file(tmp / "tensorcache.rules.yml"))
        try:
            with Load(cluster.router_address) as load:
                yield {"cluster": cluster, "prom": prom, "load": load}
        finally:
            prom.stop()


def _finite(result: list[dict[str, Any]]) -> list[float]:
    return [float(r["value"][1]) for r in result if math.isfinite(float(r["value"][1]))]


def _wait_for_data(prom: PromServer, expr: str, what: str) -> list[dict[str, Any]]:
    deadline = time.monotonic() + DEADLINE_S
    while True:
        result = prom.query(expr)
        if _finite(result):
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: no data after {DEADLINE_S:.0f}s for\n{expr}\nlast: {result}")
        time.sleep(0.5)


def test_every_target_is_scraped(scraped: dict[str, Any]) -> None:
    prom: PromServer = scraped["prom"]
    up = _wait_for_data(prom, "up", "up")
    deadline = time.monotonic() + DEADLINE_S
    while len([r for r in up if r["value"][1] == "1"]) < 4 and time.monotonic() < deadline:
        time.sleep(0.5)
        up = prom.query("up")
    assert sorted(r["metric"]["job"] for r in up if r["value"][1] == "1") == [
        "tensorcache-node"
    ] * 3 + ["tensorcache-router"]


def test_every_dashboard_query_returns_data(scraped: dict[str, Any]) -> None:
    prom: PromServer = scraped["prom"]
    queries = dashboard_queries()
    assert len(queries) >= 20
    for title, expr in queries:
        _wait_for_data(prom, expr.replace("$__rate_interval", RATE_WINDOW), title)
    load = scraped["load"]
    assert load.done["puts"] > 0 and load.done["refused"] > 0, load.done


def test_the_rules_load_and_evaluate_without_errors(scraped: dict[str, Any]) -> None:
    prom: PromServer = scraped["prom"]
    deadline = time.monotonic() + DEADLINE_S
    while True:
        groups = prom.api("rules")["groups"]
        rules = [r for g in groups for r in g["rules"]]
        if rules and all(r.get("lastEvaluation", "").startswith("20") for r in rules):
            break
        assert time.monotonic() < deadline, f"rules never evaluated: {groups}"
        time.sleep(0.5)
    assert {r["name"] for r in rules} == set(alert_expressions())
    for r in rules:
        assert r["health"] == "ok" and not r.get("lastError"), r


def test_every_alert_expression_returns_data_when_its_condition_holds(
    scraped: dict[str, Any],
) -> None:
    prom: PromServer = scraped["prom"]
    cluster: LocalCluster = scraped["cluster"]
    alerts = alert_expressions()
    # Made true by the load: 1 hit in 3 lookups, nodes evicting as fast as
    # they store, and full.
    for name in (
        "TensorcacheHitRateCollapse",
        "TensorcacheEvictionStorm",
        "TensorcacheNearCapacity",
    ):
        _wait_for_data(prom, alerts[name], name)
    hit = prom.query(alerts["TensorcacheHitRateCollapse"])
    assert 0 < _finite(hit)[0] < 0.5
    # Healthy so far: nobody down, etcd answers.
    assert prom.query(alerts["TensorcacheNodeDown"]) == []
    assert prom.query(alerts["TensorcacheEtcdUnreachable"]) == []
    victim = sorted(cluster.nodes)[0]
    address = cluster.nodes[victim].metrics_address
    cluster.stop_node(victim, kill=True)
    down = _wait_for_data(prom, alerts["TensorcacheNodeDown"], "TensorcacheNodeDown")
    assert [r["metric"]["instance"] for r in down] == [address]
    cluster.stop_etcd()
    try:
        _wait_for_data(prom, alerts["TensorcacheEtcdUnreachable"], "TensorcacheEtcdUnreachable")
    finally:
        cluster.start_etcd()
