"""A node's Prometheus metrics: what its transports record, what its store holds.

Two sources, so that nothing is counted twice:

- ``NodeMetrics.done``: called by both transports (node/dataserver.py,
  node/service.py) once per Put and Get, with the time it took, how it
  ended and the bytes it moved; kept per thread (tensorcache/metrics.py).
  ``NoMetrics`` is the do-nothing recorder of a node without
  ``--metrics-port``.
- ``NodeCollector``: at scrape time, reads the counters and gauges the
  node already keeps for ``stats()`` (``NodeOps.stat``: the store, fills,
  handoffs, rebalancing) and its data channel's connections and pins.

Every metric is listed in docs/operations.md.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import Protocol, cast

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from tensorcache.metrics import Key, Recorder, counter_family, histogram_family
from tensorcache.proto import tensorcache_pb2 as pb

#: Request operations (label ``op``) and bulk paths (label ``path``). A
#: ``head`` is a get of versions only (``version()``, strict near-cache
#: revalidation, handoff questions): counted apart, so get latency and
#: bytes describe gets that move values.
OPS = ("get", "head", "put", "delete", "fill")
PATHS = ("data", "grpc")


def request_op(req: pb.GetRequest) -> str:
    """The ``op`` label of a Get request: "head" when it asks for versions only."""
    return "head" if req.head_only else "get"


class Transfers(Protocol):
    """What a node's transports report: one call per Put, Get, Delete or Fill."""

    def done(
        self, op: str, path: str, status: str, seconds: float, received: int, sent: int, local: int
    ) -> None: ...


class NoMetrics:
    """A node without metrics: records nothing."""

    def done(
        self, op: str, path: str, status: str, seconds: float, received: int, sent: int, local: int
    ) -> None:
        pass


class NodeMetrics:
    """Per-request figures of one node, recorded per thread.

    ``status`` is the gRPC status name the request ended with ("OK", or
    e.g. "RESOURCE_EXHAUSTED"); ``received``/``sent`` are payload bytes over
    ``path``; ``local`` are bytes a co-located client copied straight out of
    this process (handed out by address, never sent).

    One row per (op, path, status) holds everything a request adds: its
    latency bucket, the sum of latencies and its bytes (``_IN``, ``_OUT``,
    ``_LOCAL`` slots after the buckets), so a request costs one dict lookup,
    one bisect and a few list increments; requests by status are the
    row's bucket counts, summed at scrape time.
    """

    def __init__(self) -> None:
        self.recorder = Recorder()
        n = len(self.recorder.bounds)
        self._width = n + 5  # buckets, +Inf, sum, in, out, local
        self._sum, self._in, self._out, self._local = n + 1, n + 2, n + 3, n + 4

    def done(
        self, op: str, path: str, status: str, seconds: float, received: int, sent: int, local: int
    ) -> None:
        rows = self.recorder.shard().hists
        key = (op, path, status)
        row = rows.get(key)
        if row is None:
            row = rows[key] = [0] * (self._width - 4) + [0.0, 0, 0, 0]
        row[bisect_left(self.recorder.bounds, seconds)] += 1
        row[self._sum] += seconds
        if received:
            row[self._in] += received
        if sent:
            row[self._out] += sent
        if local:
            row[self._local] += local

    def totals(self) -> tuple[dict[Key, list[float]], dict[Key, int]]:
        """(histogram rows by (op, path), counts as the collector names them)."""
        n = len(self.recorder.bounds)
        hists: dict[Key, list[float]] = {}
        counts: dict[Key, int] = {}
        for key, row in self.recorder.snapshot().hists.items():
            op, path, status = cast(tuple[str, str, str], key)
            h = hists.setdefault((op, path), [0] * (n + 1) + [0.0])
            for i in range(n + 2):
                h[i] += row[i]
            counts[("req", op, path, status)] = int(sum(row[: n + 1]))
            for tag, where, slot in (
                ("in", path, self._in),
                ("out", path, self._out),
                ("out", "local", self._local),
            ):
                if row[slot]:
                    counts[(tag, where)] = counts.get((tag, where), 0) + int(row[slot])
        return hists, counts


class DataChannel(Protocol):
    def connections(self) -> int: ...
    def pinned_bytes(self) -> int: ...


def _pick(tag: str, width: int) -> Callable[[Key], tuple[str, ...] | None]:
    def select(key: Key) -> tuple[str, ...] | None:
        if isinstance(key, tuple) and key[0] == tag and len(key) == width + 1:
            return tuple(str(k) for k in key[1:])
        return None

    return select


def _hist_key(key: Key) -> tuple[str, ...] | None:
    if isinstance(key, tuple) and len(key) == 2:
        return (str(key[0]), str(key[1]))
    return None


class NodeCollector:
    """Everything ``/metrics`` shows for one node, read when scraped."""

    def __init__(
        self,
        stat: Callable[[], pb.NodeStats],
        metrics: NodeMetrics,
        data: DataChannel | None = None,
    ) -> None:
        self._stat = stat
        self._metrics = metrics
        self._data = data

    def describe(self) -> list[Metric]:
        return []  # unchecked registry: names come with collect()

    def collect(self) -> Iterator[Metric]:
        s = self._stat()
        yield from self._store(s)
        yield from self._movement(s)
        yield from self._disk(s)
        yield from self._requests()
        if self._data is not None:
            yield _gauge(
                "tensorcache_node_data_connections",
                "Open data-channel connections (clients and peers).",
                self._data.connections(),
            )
            yield _gauge(
                "tensorcache_node_local_pinned_bytes",
                "Bytes of entries handed out by address to co-located readers and held "
                "until they finish copying (outside the byte budget while evicted).",
                self._data.pinned_bytes(),
            )

    @staticmethod
    def _store(s: pb.NodeStats) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "tensorcache_node_info",
            "This node: its name and eviction policy.",
            labels=["node", "policy"],
        )
        info.add_metric([s.name, s.policy], 1)
        yield info
        yield _gauge("tensorcache_node_capacity_bytes", "The node's byte budget.", s.capacity)
        yield _gauge(
            "tensorcache_node_stored_bytes",
            "Bytes charged for stored entries (payload, key, metadata, overhead).",
            s.bytes_used,
        )
        yield _gauge(
            "tensorcache_node_reserved_bytes",
            "Bytes reserved by puts in flight (0 on an idle node).",
            s.bytes_reserved,
        )
        yield _gauge(
            "tensorcache_node_pinned_bytes",
            "Bytes of pinned entries (never evicted), within the pinned quota.",
            s.pinned_bytes,
        )
        yield _gauge(
            "tensorcache_node_pinned_capacity_bytes",
            "The node's pinned quota (--pinned-capacity), part of its capacity.",
            s.pinned_capacity,
        )
        yield _gauge(
            "tensorcache_node_pinned_entries", "Pinned entries (tensors and stripes).", s.pinned
        )
        yield _counter(
            "tensorcache_node_pins_dropped",
            "Pinned copies moved here that found the quota full (stored unpinned).",
            s.pins_dropped,
        )
        entries = GaugeMetricFamily(
            "tensorcache_node_entries",
            "Entries served, by kind (tensor: a whole value or a manifest; shard: a stripe).",
            labels=["kind"],
        )
        entries.add_metric(["tensor"], s.keys)
        entries.add_metric(["shard"], s.shards)
        yield entries
        yield _gauge(
            "tensorcache_node_demoted_entries",
            "Entries held but owned elsewhere now, on their way to their new owners.",
            s.demoted,
        )
        yield _gauge(
            "tensorcache_node_rebalance_pending",
            "Rebalance work left: keys not yet looked at plus copies not yet pushed (0: settled).",
            s.pending,
        )
        yield _gauge(
            "tensorcache_node_ring_epoch", "The newest ring epoch this node installed.", s.epoch
        )
        lookups = CounterMetricFamily(
            "tensorcache_node_lookups",
            "Tensor keys looked up by gets, by result (hit: found here).",
            labels=["result"],
        )
        lookups.add_metric(["hit"], s.hits)
        lookups.add_metric(["miss"], s.misses)
        yield lookups
        evictions = CounterMetricFamily(
            "tensorcache_node_evictions",
            "Entries dropped to make room under the byte budget, by eviction policy.",
            labels=["policy"],
        )
        evictions.add_metric([s.policy], s.evictions)
        yield evictions
        yield _counter("tensorcache_node_committed_entries", "Entries committed by puts.", s.puts)
        yield _counter("tensorcache_node_deleted_entries", "Entries deleted.", s.deletes)

    @staticmethod
    def _movement(s: pb.NodeStats) -> Iterator[Metric]:
        yield _counter(
            "tensorcache_node_invalidated_entries",
            "Entries dropped because a namespace invalidation covers them.",
            s.invalidated,
        )
        yield _counter(
            "tensorcache_node_handoffs",
            "Entries fetched from an earlier owner on a miss.",
            s.handoffs,
        )
        yield _counter(
            "tensorcache_node_rereplicated",
            "Copies pushed to replica-set members that lacked them after ring changes.",
            s.rereplicated,
        )
        yield _counter(
            "tensorcache_node_drained",
            "Copies pushed to new owners by a SIGTERM drain (confirmed by them).",
            s.drained,
        )
        yield _counter(
            "tensorcache_node_moved",
            "Demoted entries dropped once every member of their new replica set had a copy.",
            s.moved,
        )
        yield _counter(
            "tensorcache_node_discarded",
            "Hidden copies dropped: a newer copy or a delete was found elsewhere.",
            s.discarded,
        )
        yield _counter(
            "tensorcache_node_revived",
            "Hidden copies served again: nobody held a newer one or deleted the key.",
            s.revived,
        )
        yield _counter(
            "tensorcache_node_fill_grants",
            "Fill leases granted: loads run by a caller after a miss (get_or_load).",
            s.fills,
        )
        yield _counter(
            "tensorcache_node_fill_waits",
            "Fill requests told to wait for another caller's load (loads saved).",
            s.fill_waits,
        )

    @staticmethod
    def _disk(s: pb.NodeStats) -> Iterator[Metric]:
        """The disk tier under RAM (node --disk-path); nothing without one."""
        if not s.disk_capacity:
            return
        yield _gauge(
            "tensorcache_node_disk_capacity_bytes", "The disk tier's byte budget.", s.disk_capacity
        )
        yield _gauge(
            "tensorcache_node_disk_stored_bytes", "File bytes held by the disk tier.", s.disk_bytes
        )
        yield _gauge(
            "tensorcache_node_disk_entries",
            "Entries with a file (spilled, or read back and resident).",
            s.disk_files,
        )
        yield _counter(
            "tensorcache_node_disk_hits",
            "Gets served from a spilled entry (also counted as hits).",
            s.disk_hits,
        )
        yield _counter("tensorcache_node_disk_spills", "Entries written to disk.", s.disk_spills)
        yield _counter(
            "tensorcache_node_disk_write_drops",
            "Evicted entries the write queue had no room for (lost; also evictions).",
            s.disk_write_drops,
        )
        yield _counter(
            "tensorcache_node_disk_evictions",
            "Files evicted for the disk budget.",
            s.disk_evictions,
        )
        yield _counter(
            "tensorcache_node_disk_corrupt",
            "Torn or corrupt files found (at start or on read) and dropped.",
            s.disk_corrupt,
        )
        yield _counter(
            "tensorcache_node_disk_loaded",
            "Entries found on disk at start (warm restart).",
            s.disk_loaded,
        )

    def _requests(self) -> Iterator[Metric]:
        hists, counts = self._metrics.totals()
        yield histogram_family(
            "tensorcache_node_request_duration_seconds",
            "Time to serve a Put, Get, Delete or Fill, from its header to its last byte, by path.",
            ["op", "path"],
            hists,
            self._metrics.recorder.bounds,
            _hist_key,
        )
        yield counter_family(
            "tensorcache_node_requests",
            "Puts, Gets, Deletes and Fills served, by path and gRPC status (OK or the error's).",
            ["op", "path", "status"],
            counts,
            _pick("req", 3),
            always=[(op, path, "OK") for op in OPS for path in PATHS],
        )
        yield counter_family(
            "tensorcache_node_received_bytes",
            "Payload bytes received by puts, by path.",
            ["path"],
            counts,
            _pick("in", 1),
            always=[(p,) for p in PATHS],
        )
        yield counter_family(
            "tensorcache_node_sent_bytes",
            "Payload bytes served by gets, by path (local: copied by a co-located "
            "client straight from this process).",
            ["path"],
            counts,
            _pick("out", 1),
            always=[(p,) for p in (*PATHS, "local")],
        )


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)
