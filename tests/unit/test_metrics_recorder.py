"""tensorcache/metrics.py: per-thread recording, summed at scrape time."""

from __future__ import annotations

import threading

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tensorcache.metrics import BUCKETS_S, Recorder, counter_family, histogram_family

pytestmark = pytest.mark.unit


def test_buckets_span_50us_to_10s() -> None:
    assert BUCKETS_S[0] == 50e-6 and BUCKETS_S[-1] == 10.0
    assert list(BUCKETS_S) == sorted(set(BUCKETS_S))


def test_a_value_on_a_bound_counts_in_that_bucket() -> None:
    """Prometheus buckets are "le": 1 ms goes in le=0.001, just above goes in the next."""
    rec = Recorder((0.001, 0.01))
    for v in (0.0005, 0.001, 0.0011, 0.01, 5.0):
        rec.observe("get", v)
    row = rec.snapshot().hists["get"]
    assert row[:3] == [2, 2, 1]  # le=0.001, le=0.01, above
    assert row[-1] == pytest.approx(0.0005 + 0.001 + 0.0011 + 0.01 + 5.0)


def test_threads_record_apart_and_sum_including_ended_ones() -> None:
    rec = Recorder()
    n_threads, n_each = 8, 5000
    go = threading.Barrier(n_threads)

    def work() -> None:
        go.wait()
        for _ in range(n_each):
            rec.observe(("get", "data"), 0.0002)
            rec.add(("req", "get"))

    threads = [threading.Thread(target=work) for _ in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = rec.snapshot()  # every thread ended: all folded into the retired shard
    assert snap.counts[("req", "get")] == n_threads * n_each
    assert sum(snap.hists[("get", "data")][:-1]) == n_threads * n_each
    rec.add(("req", "get"))  # a live thread's shard and the retired one, summed
    assert rec.snapshot().counts[("req", "get")] == n_threads * n_each + 1
    assert rec.snapshot().counts[("req", "get")] == n_threads * n_each + 1  # no double fold


def test_families_render_as_valid_exposition() -> None:
    rec = Recorder((0.001, 0.1))
    rec.observe(("get", "data"), 0.01)
    rec.add(("req", "get", "OK"), 3)

    class C:
        def describe(self) -> list[object]:
            return []

        def collect(self):  # type: ignore[no-untyped-def]
            snap = rec.snapshot()
            yield histogram_family(
                "tensorcache_x_seconds",
                "x",
                ["op", "path"],
                snap.hists,
                rec.bounds,
                lambda k: k if isinstance(k, tuple) and len(k) == 2 else None,
            )
            yield counter_family(
                "tensorcache_x_requests",
                "y",
                ["op", "status"],
                snap.counts,
                lambda k: k[1:] if isinstance(k, tuple) and k[0] == "req" else None,
                always=[("put", "OK")],
            )

    reg = CollectorRegistry(auto_describe=False)
    reg.register(C())  # type: ignore[arg-type]
    text = generate_latest(reg).decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }
    assert (
        samples[
            ("tensorcache_x_seconds_bucket", (("le", "0.001"), ("op", "get"), ("path", "data")))
        ]
        == 0
    )
    assert (
        samples[("tensorcache_x_seconds_bucket", (("le", "0.1"), ("op", "get"), ("path", "data")))]
        == 1
    )
    assert (
        samples[("tensorcache_x_seconds_bucket", (("le", "+Inf"), ("op", "get"), ("path", "data")))]
        == 1
    )
    assert samples[("tensorcache_x_requests_total", (("op", "get"), ("status", "OK")))] == 3
    assert samples[("tensorcache_x_requests_total", (("op", "put"), ("status", "OK")))] == 0


def test_recorder_refuses_unsorted_buckets() -> None:
    with pytest.raises(ValueError, match="increasing"):
        Recorder((0.1, 0.01))
