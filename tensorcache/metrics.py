"""Prometheus plumbing shared by nodes, routers and clients: cheap recording, exposition.

What a process *has* (stored bytes, members, counters it already keeps for
``stats()``) is read at scrape time by a custom collector in its component
(node/metrics.py, router/metrics.py, client/metrics.py): no second copy of
any counter. What only the data path sees (how long each get and put took,
how many bytes moved which way, how each request ended) is recorded here,
on the hot path, so it has to cost next to nothing:

- ``Recorder`` keeps one *shard* of plain dicts per thread (a data-channel
  connection, a gRPC worker). A thread writes only its own shard, with no
  lock: an observation is a ``bisect`` and two list increments (~0.3 µs),
  where prometheus_client's ``Histogram.observe`` takes a lock per call.
  A scrape sums the shards (dict copies are atomic under the GIL); shards of
  threads that ended are folded into one retired shard, so their counts stay
  and the list of shards stays as long as the list of live threads.
- ``histogram_family`` and ``counter_family`` turn a snapshot into metric
  families for a collector.

Conventions (checked by tests/unit/test_metrics_naming.py and
``promtool check metrics``): every name starts with ``tensorcache_``, base
units in the name (``_seconds``, ``_bytes``), counters end in ``_total``,
and labels take a handful of fixed values (operation, path, status, kind):
never a key, an address or anything a user chooses.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Hashable, Iterable, Sequence
from wsgiref.simple_server import WSGIServer

from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

#: Access-time buckets, 50 µs .. 10 s: a co-located hit of a small entry
#: takes well under a millisecond, a multi-GiB stripe set several seconds.
BUCKETS_S: tuple[float, ...] = (
    50e-6,
    100e-6,
    250e-6,
    500e-6,
    1e-3,
    2.5e-3,
    5e-3,
    10e-3,
    25e-3,
    50e-3,
    100e-3,
    250e-3,
    500e-3,
    1.0,
    2.5,
    5.0,
    10.0,
)

Key = Hashable


class Shard:
    """One thread's counts. Only that thread writes it."""

    __slots__ = ("counts", "hists")

    def __init__(self) -> None:
        #: key -> [count per bucket..., count above the last bucket, sum of seconds]
        self.hists: dict[Key, list[float]] = {}
        self.counts: dict[Key, int] = {}

    def observe(self, key: Key, seconds: float, bounds: Sequence[float]) -> None:
        row = self.hists.get(key)
        if row is None:
            row = self.hists[key] = [0] * (len(bounds) + 1) + [0.0]
        row[bisect.bisect_left(bounds, seconds)] += 1  # buckets are "le": first bound >= v
        row[-1] += seconds

    def add(self, key: Key, n: int = 1) -> None:
        counts = self.counts
        counts[key] = counts.get(key, 0) + n

    def merge(self, hists: dict[Key, list[float]], counts: dict[Key, int]) -> None:
        for key, row in hists.items():
            mine = self.hists.get(key)
            if mine is None:
                self.hists[key] = list(row)
            else:
                for i, v in enumerate(row):
                    mine[i] += v
        for key, n in counts.items():
            self.counts[key] = self.counts.get(key, 0) + n


class Recorder:
    """Counters and latency histograms recorded per thread, summed at scrape time."""

    def __init__(self, buckets: Sequence[float] = BUCKETS_S) -> None:
        if list(buckets) != sorted(buckets) or not buckets:
            raise ValueError("buckets must be a non-empty increasing sequence")
        self.bounds: tuple[float, ...] = tuple(buckets)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._live: list[tuple[threading.Thread, Shard]] = []
        self._retired = Shard()

    def shard(self) -> Shard:
        """The calling thread's shard (created on its first use)."""
        try:
            shard: Shard = self._local.shard
        except AttributeError:
            shard = self._local.shard = Shard()
            with self._lock:
                self._retire_locked()
                self._live.append((threading.current_thread(), shard))
        return shard

    def observe(self, key: Key, seconds: float) -> None:
        self.shard().observe(key, seconds, self.bounds)

    def add(self, key: Key, n: int = 1) -> None:
        self.shard().add(key, n)

    def _retire_locked(self) -> None:
        alive = []
        for thread, shard in self._live:
            if thread.is_alive():
                alive.append((thread, shard))
            else:  # it writes no more: fold it in once
                self._retired.merge(shard.hists, shard.counts)
        self._live = alive

    def snapshot(self) -> Shard:
        """The sum over every thread, ended ones included."""
        total = Shard()
        with self._lock:
            self._retire_locked()
            total.merge(self._retired.hists, self._retired.counts)
            shards = [s for _, s in self._live]
        for s in shards:
            # dict.copy() and list() are single C calls: atomic under the GIL,
            # so a writer mid-update cannot break them (it may land just after).
            hists = {k: list(v) for k, v in s.hists.copy().items()}
            total.merge(hists, s.counts.copy())
        return total


def histogram_family(
    name: str,
    documentation: str,
    labels: Sequence[str],
    rows: dict[Key, list[float]],
    bounds: Sequence[float],
    select: Callable[[Key], tuple[str, ...] | None],
) -> HistogramMetricFamily:
    """A histogram family from a snapshot's rows; ``select`` maps a row key to
    its label values (None: not this family's row)."""
    family = HistogramMetricFamily(name, documentation, labels=list(labels))
    for key, row in sorted(rows.items(), key=lambda kv: repr(kv[0])):
        values = select(key)
        if values is None:
            continue
        cumulative = 0.0
        buckets: list[tuple[str, float]] = []
        for bound, n in zip(bounds, row, strict=False):
            cumulative += n
            buckets.append((_le(bound), cumulative))
        cumulative += row[len(bounds)]
        buckets.append(("+Inf", cumulative))
        family.add_metric(list(values), buckets, row[-1])
    return family


def counter_family(
    name: str,
    documentation: str,
    labels: Sequence[str],
    counts: dict[Key, int],
    select: Callable[[Key], tuple[str, ...] | None],
    *,
    always: Iterable[tuple[str, ...]] = (),
) -> CounterMetricFamily:
    """A counter family from a snapshot's counts (``name`` without ``_total``).

    ``always``: label values exported even before anything was counted (at 0),
    so queries and alerts on them have data from the first scrape.
    """
    family = CounterMetricFamily(name, documentation, labels=list(labels))
    values: dict[tuple[str, ...], float] = dict.fromkeys(always, 0)
    for key, n in counts.items():
        got = select(key)
        if got is not None:
            values[got] = values.get(got, 0) + n
    for labels_, total in sorted(values.items()):
        family.add_metric(list(labels_), total)
    return family


def _le(bound: float) -> str:
    return repr(float(bound))


class Exporter:
    """A registry served over HTTP at ``/metrics`` (prometheus_client's server).

    Plain HTTP: bind it where only the monitoring network reaches
    (docs/operations.md); it reveals sizes and counts, never keys or values.
    """

    def __init__(self, collectors: Iterable[Collector], host: str, port: int) -> None:
        if not 0 <= port < 65536:
            raise ValueError(f"metrics port must be 0..65535, got {port}")
        self.registry = CollectorRegistry(auto_describe=False)
        for c in collectors:
            self.registry.register(c)
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        self._server: WSGIServer = server
        self._thread = thread
        self.port: int = server.server_port

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
