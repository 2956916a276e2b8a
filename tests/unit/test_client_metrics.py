"""client/metrics.py against a real Client on the in-memory cluster: every counter
the client keeps is exported under a conventional name, and calls are timed."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import tensorcache
from tensorcache.client import metrics as client_metrics
from tensorcache.client.metrics import ClientCollector
from tensorcache.testing import FakeCluster

pytestmark = pytest.mark.unit

CLIENT_SRC = Path(client_metrics.__file__).resolve().parent


def _exposition(client: object) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(ClientCollector(client))  # type: ignore[arg-type]
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(generate_latest(reg).decode())
        for s in f.samples
    }


def test_every_client_counter_has_a_metric() -> None:
    """Every name the client counts anywhere in client/ (``_count("name", other=n)``,
    or a ``count("name")`` callback) or reports in ``metrics()`` is exported, or
    derived from ones that are."""
    counted: set[str] = set()
    for path in CLIENT_SRC.glob("*.py"):
        text = path.read_text()
        for call in re.finditer(r"\b_?count\(\s*\"([a-z_]+)\"(.*)", text):
            counted.add(call.group(1))
            counted.update(re.findall(r"\b([a-z_]+)=(?!=)", call.group(2)))  # the rest of its line
        counted.update(re.findall(r"out\[\"([a-z_]+)\"\] =", text))
    known = set(client_metrics._COUNTERS) | set(client_metrics._GAUGES) | client_metrics.DERIVED
    assert counted, "found no counters: the pattern is stale"
    assert counted <= known, f"not exported: {sorted(counted - known)}"


def test_counts_and_latency_of_a_timed_client() -> None:
    with FakeCluster(["a", "b"]).connect(metrics=True, near_cache="1MiB") as c:
        for i in range(5):
            c.put(f"k{i}", np.arange(100))
        assert c.get("k0") is not None
        assert c.get("k0") is not None  # a near-cache hit, revalidated
        assert c.get("missing") is None
        with pytest.raises(tensorcache.InvalidArgument):
            c.put("", np.arange(3))
        got = _exposition(c)
    assert got[("tensorcache_client_put_keys_total", ())] == 5
    assert got[("tensorcache_client_near_cache_lookups_total", (("result", "hit"),))] >= 1
    assert got[("tensorcache_client_get_keys_total", (("result", "miss"),))] >= 1
    assert got[("tensorcache_client_request_duration_seconds_count", (("op", "put"),))] == 6
    assert got[("tensorcache_client_request_duration_seconds_count", (("op", "get"),))] == 3
    err = (("error", "InvalidArgument"), ("op", "put"))
    assert got[("tensorcache_client_errors_total", err)] == 1


def test_an_untimed_client_exports_counters_only() -> None:
    with FakeCluster(["a"]).connect() as c:
        c.put("k", np.arange(4))
        got = _exposition(c)
    assert got[("tensorcache_client_put_keys_total", ())] == 1
    assert not any(name.startswith("tensorcache_client_request_duration") for name, _ in got)
