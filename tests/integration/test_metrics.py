"""Every process's /metrics, checked: promtool, naming, cardinality, figures.

A real cluster (router + 3 nodes with ``--metrics-port 0``) and an opt-in
client serve their expositions after a known workload; each must pass
``promtool check metrics``, follow the naming rules promtool does not check
(tests below), never carry a key, and count exactly what was done.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

import tensorcache
from tensorcache.apps.cluster import LocalCluster
from tensorcache.client.metrics import serve_metrics

from .helpers import poll
from .promtools import promtool, scrape

pytestmark = pytest.mark.integration

MARK = "zq-secret-key-name"  # in every key: must appear in no exposition
SMALL_PUTS = 40
SMALL_NBYTES = 4000 * 4
MISSES = 7
# The labels a metric may carry, and their most distinct values anywhere.
LABELS = {"op", "path", "status", "result", "kind", "policy", "node", "membership", "error"}
MAX_VALUES = 16


@pytest.fixture(scope="module")
def expositions(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Run a known workload, then scrape every process and the client."""
    log_dir = tmp_path_factory.mktemp("metrics")
    with LocalCluster(3, capacity="48MiB", log_dir=log_dir, metrics=True) as c:
        # No striping: one entry per put, so requests can be counted exactly.
        with tensorcache.connect(c.router_address, metrics=True, stripe_size="64MiB") as client:
            before = {n: scrape(p.metrics_address) for n, p in c.nodes.items()}
            for i in range(SMALL_PUTS):
                client.put(f"{MARK}/small/{i}", np.full(4000, i, np.float32))
            for i in range(SMALL_PUTS):
                assert client.get(f"{MARK}/small/{i}") is not None
            for i in range(MISSES):
                assert client.get(f"{MARK}/missing/{i}") is None
            # A large entry, and one larger than any node: refused (errors by status).
            client.put(f"{MARK}/big", np.ones(24 * 1024 * 1024, np.uint8))
            with pytest.raises(tensorcache.CapacityExceeded):
                client.put(f"{MARK}/huge", np.ones(60 * 1024 * 1024, np.uint8))
            exporter = serve_metrics(client)
            try:
                texts = {n: scrape(p.metrics_address) for n, p in c.nodes.items()}
                assert c.router is not None
                texts["router"] = scrape(c.router.metrics_address)
                texts["client"] = scrape(f"127.0.0.1:{exporter.port}")
            finally:
                exporter.close()
            stats = {s.name: s for s in client.stats()}
        yield {"texts": texts, "before": before, "stats": stats}


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _sum(text: str, name: str, **labels: str) -> float:
    return sum(
        v
        for (n, ls), v in _samples(text).items()
        if n == name and all(dict(ls).get(k) == want for k, want in labels.items())
    )


def test_promtool_check_metrics_passes_on_every_process(expositions: dict[str, Any]) -> None:
    for who, text in expositions["texts"].items():
        assert "tensorcache_" in text, who
        got = promtool("check", "metrics", stdin=text)
        assert got.returncode == 0 and not got.stdout.strip() and not got.stderr.strip(), (
            f"{who}: promtool check metrics: {got.stdout}{got.stderr}"
        )


def test_names_follow_prometheus_conventions(expositions: dict[str, Any]) -> None:
    """What promtool leaves to us: prefix, component, units, suffixes, help."""
    for who, text in expositions["texts"].items():
        component = "node" if who.startswith("node-") else who
        for family in text_string_to_metric_families(text):
            name = family.name
            assert re.fullmatch(rf"tensorcache_{component}_[a-z][a-z0-9_]*[a-z0-9]", name), name
            assert family.documentation, f"{name} has no HELP"
            assert "__" not in name, name
            if family.type == "counter":
                assert all(s.name == name + "_total" for s in family.samples), name
            else:
                assert not name.endswith("_total"), f"{name}: _total on a {family.type}"
            if family.type == "histogram":
                assert name.endswith("_seconds"), f"{name}: histograms here are durations"
            if "byte" in name:
                assert name.endswith("_bytes"), f"{name}: bytes in the name, not the unit"
            for unit in ("_ms", "_us", "_kb", "_mb", "_kib", "_mib", "_milliseconds"):
                assert unit not in name, f"{name}: not a base unit"
            if family.documentation.lower().startswith(("bytes", "payload bytes")):
                assert name.endswith("_bytes"), f"{name} counts bytes"


def test_labels_are_few_and_never_a_key(expositions: dict[str, Any]) -> None:
    for who, text in expositions["texts"].items():
        assert MARK not in text, f"{who} exposes a key"
        values: dict[tuple[str, str], set[str]] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                for label, value in s.labels.items():
                    if label in ("le", "quantile"):
                        continue
                    assert label in LABELS, f"{family.name}: unexpected label {label!r}"
                    values.setdefault((family.name, label), set()).add(value)
        for (name, label), seen in values.items():
            assert len(seen) <= MAX_VALUES, f"{name}{{{label}}}: {len(seen)} values"


def test_node_figures_count_exactly_what_was_done(expositions: dict[str, Any]) -> None:
    """Summed over nodes: one put and one get request per small key, its bytes, the refusals."""
    texts, before = expositions["texts"], expositions["before"]
    nodes = [n for n in texts if n.startswith("node-")]

    def delta(name: str, **labels: str) -> float:
        return sum(_sum(texts[n], name, **labels) - _sum(before[n], name, **labels) for n in nodes)

    # 41 puts over the data channel, and the refused one, refused before its payload.
    ok = delta("tensorcache_node_requests_total", op="put", path="data", status="OK")
    assert ok == SMALL_PUTS + 1
    refused = delta("tensorcache_node_requests_total", op="put", status="RESOURCE_EXHAUSTED")
    assert refused == 1
    assert delta("tensorcache_node_requests_total", op="put", path="grpc") == 0
    count = delta("tensorcache_node_request_duration_seconds_count", op="put", path="data")
    assert count == ok + refused
    assert delta("tensorcache_node_received_bytes_total", path="data") == (
        SMALL_PUTS * SMALL_NBYTES + 24 * 1024 * 1024
    )
    # Entries under 256 KiB are sent, even to a co-located client.
    assert delta("tensorcache_node_sent_bytes_total", path="data") == SMALL_PUTS * SMALL_NBYTES
    assert delta("tensorcache_node_lookups_total", result="hit") == SMALL_PUTS
    assert delta("tensorcache_node_lookups_total", result="miss") >= MISSES
    # Gauges read at scrape time are the node's own stats.
    for n in nodes:
        s = expositions["stats"][n]
        assert _sum(texts[n], "tensorcache_node_capacity_bytes") == s.capacity
        assert _sum(texts[n], "tensorcache_node_entries", kind="tensor") == s.keys
        assert _sum(texts[n], "tensorcache_node_stored_bytes") == s.bytes_used


def test_router_and_client_figures(expositions: dict[str, Any]) -> None:
    router, client = expositions["texts"]["router"], expositions["texts"]["client"]
    assert _sum(router, "tensorcache_router_members") == 3
    assert _sum(router, "tensorcache_router_up") == 1
    assert _sum(router, "tensorcache_router_ring_changes_total") >= 1
    assert _sum(client, "tensorcache_client_put_keys_total") == SMALL_PUTS + 1
    assert _sum(client, "tensorcache_client_get_keys_total", result="miss") == MISSES
    count = _sum(client, "tensorcache_client_request_duration_seconds_count", op="put")
    assert count == SMALL_PUTS + 2
    assert _sum(client, "tensorcache_client_errors_total", op="put", error="CapacityExceeded") == 1


def test_disk_tier_metrics(make_cluster: Any, tmp_path: Any) -> None:
    """A node with a disk tier exports its figures too, and they pass promtool."""
    c = make_cluster(1, capacity="4MiB", metrics=True, disk_path=tmp_path, disk_capacity="64MiB")
    with tensorcache.connect(c.router_address) as client:
        for i in range(40):  # 40 x 256 KiB through a 4 MiB node: evictions spill to disk
            client.put(f"{MARK}/disk/{i}", np.full(64 * 1024, i, np.float32))
    (node,) = c.nodes.values()
    # Spills are written behind the data path: wait for the first one.
    text = poll(
        lambda: (
            (t := scrape(node.metrics_address))
            and _sum(t, "tensorcache_node_disk_spills_total") > 0
            and t
        ),
        timeout=60,
        what="a spill to the disk tier",
    )
    got = promtool("check", "metrics", stdin=text)
    assert got.returncode == 0 and not got.stdout.strip(), got.stdout + got.stderr
    assert MARK not in text
    assert _sum(text, "tensorcache_node_disk_capacity_bytes") == 64 * 1024 * 1024
    assert _sum(text, "tensorcache_node_disk_spills_total") > 0
    assert _sum(text, "tensorcache_node_committed_entries_total") == 40
