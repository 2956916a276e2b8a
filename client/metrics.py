"""Prometheus metrics of one worker's client, opt-in.

``connect(router, metrics=True)`` makes the client time its calls (get,
put, get_many, put_many; per thread, tensorcache/metrics.py); everything
else comes from the counters it keeps anyway (``Client.metrics()``), read at
scrape time. Expose them with ``serve_metrics(client, port)`` (their own
``/metrics``), or register ``ClientCollector(client)`` in the worker's own
registry next to its other metrics. A client without ``metrics=True`` pays
nothing on its calls, and its collector still exports the counters.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, Protocol, TypeVar

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from tensorcache.errors import TensorCacheError
from tensorcache.metrics import Exporter, Key, Recorder, counter_family, histogram_family

if TYPE_CHECKING:
    from tensorcache.client.nearcache import NearCache
    from tensorcache.client.watch import EventWatcher

P = ParamSpec("P")
R = TypeVar("R")
OPS = ("get", "put", "get_many", "put_many")


class _Timed(Protocol):
    _timing: Recorder | None


S = TypeVar("S", bound=_Timed)


def timed(op: str) -> Callable[[Callable[Concatenate[S, P], R]], Callable[Concatenate[S, P], R]]:
    """Time a Client method into its recorder (when it has one) as operation ``op``."""

    def wrap(fn: Callable[Concatenate[S, P], R]) -> Callable[Concatenate[S, P], R]:
        def call(self: S, /, *args: P.args, **kwargs: P.kwargs) -> R:
            rec = self._timing
            if rec is None:
                return fn(self, *args, **kwargs)
            start = time.perf_counter()
            try:
                return fn(self, *args, **kwargs)
            except TensorCacheError as exc:
                rec.add(("err", op, type(exc).__name__))
                raise
            finally:
                rec.observe(op, time.perf_counter() - start)

        functools.update_wrapper(call, fn)
        return call

    return wrap


def counters(
    counts: dict[str, int], ring_refreshes: int, near: NearCache | None, watch: EventWatcher | None
) -> dict[str, int]:
    """What ``Client.metrics()`` returns: its counts, then the gauges of its parts."""
    out = dict(counts)
    out["ring_refreshes"] = ring_refreshes
    if near is not None:
        out["near_bytes"] = near.bytes_used
        out["near_dropped_by_events"] = near.dropped_by_events
    if watch is not None:
        out["watch_events"] = watch.events
        out["watch_reconnects"] = watch.reconnects
        # 1/0: the stream is up; its last message said complete; hits
        # are being served without asking the owner (docs/consistency.md).
        out["watch_connected"] = int(watch.connected)
        out["watch_complete"] = int(watch.complete)
        out["watch_live"] = int(watch.live)
    return out


class _Client(Protocol):
    _timing: Recorder | None

    def metrics(self) -> dict[str, int]: ...


# Client.metrics() name -> (metric name without _total, labels, help).
_COUNTERS: dict[str, tuple[str, tuple[tuple[str, str], ...], str]] = {
    "hits": ("tensorcache_client_get_keys", (("result", "hit"),), "Keys read, by result."),
    "misses": ("tensorcache_client_get_keys", (("result", "miss"),), "Keys read, by result."),
    "near_hits": (
        "tensorcache_client_near_cache_lookups",
        (("result", "hit"),),
        "Near-cache lookups, by result (stale: held but outdated, dropped).",
    ),
    "near_misses": ("tensorcache_client_near_cache_lookups", (("result", "miss"),), ""),
    "near_stale": ("tensorcache_client_near_cache_lookups", (("result", "stale"),), ""),
    "puts": ("tensorcache_client_put_keys", (), "Keys written by puts."),
    "bytes_put": ("tensorcache_client_put_bytes", (), "Payload bytes written by puts."),
    "bytes_got": ("tensorcache_client_get_bytes", (), "Payload bytes read by gets (found keys)."),
    "deletes": ("tensorcache_client_deletes", (), "Delete calls."),
    "invalidations": ("tensorcache_client_invalidations", (), "Namespace invalidations made."),
    "retries": (
        "tensorcache_client_retries",
        (),
        "Batches retried after a stale epoch or an unreachable node (ring refreshed).",
    ),
    "failovers": (
        "tensorcache_client_failovers",
        (),
        "Requests moved to the next replica because a node was unreachable.",
    ),
    "ring_refreshes": ("tensorcache_client_ring_refreshes", (), "Ring snapshots fetched."),
    "stripe_retries": (
        "tensorcache_client_stripe_retries",
        (),
        "Striped reads retried (a newer put replaced the stripes being read).",
    ),
    "data_fallbacks": (
        "tensorcache_client_data_fallbacks",
        (),
        "Requests that fell back from the data channel to gRPC.",
    ),
    "local_reads": (
        "tensorcache_client_local_reads",
        (),
        "Reads copied straight out of a co-located node's memory.",
    ),
    "local_fallbacks": (
        "tensorcache_client_local_fallbacks",
        (),
        "Co-located reads that fell back to the network.",
    ),
    "corrupt": ("tensorcache_client_corrupt", (), "Payloads whose checksum did not match."),
    "misses_confirmed": (
        "tensorcache_client_misses_confirmed",
        (),
        "Primary misses confirmed at the next replica.",
    ),
    "replica_hits": (
        "tensorcache_client_replica_hits",
        (),
        "Primary misses found at the next replica.",
    ),
    "stale_rejected": (
        "tensorcache_client_stale_rejected",
        (),
        "Gets that found a value older than min_version (reported as misses).",
    ),
    "near_dropped_by_events": (
        "tensorcache_client_near_cache_dropped",
        (),
        "Near-cache entries dropped by a key event or an invalidation (watch mode).",
    ),
    "watch_events": ("tensorcache_client_watch_events", (), "Key events received (watch mode)."),
    "watch_reconnects": (
        "tensorcache_client_watch_reconnects",
        (),
        "Event stream reconnections (watch mode).",
    ),
    "staged_gets": (
        "tensorcache_client_staged_gets",
        (),
        "Keys read onto a device through pinned staging buffers (torch device= gets).",
    ),
    "loads": (
        "tensorcache_client_loads",
        (),
        "Loaders run by get_or_load after a miss (this worker held the fill lease).",
    ),
    "fill_waits": (
        "tensorcache_client_fill_waits",
        (),
        "Times get_or_load waited for another worker's load instead of loading.",
    ),
    "fill_takeovers": (
        "tensorcache_client_fill_takeovers",
        (),
        "Fills taken over from a filler whose lease lapsed (killed, cut off, stuck).",
    ),
    "fill_conflicts": (
        "tensorcache_client_fill_conflicts",
        (),
        "Loads whose put found the key already written by another worker.",
    ),
    "stripe_misses": (
        "tensorcache_client_stripe_misses",
        (),
        "Striped reads with a stripe missing or replaced (re-read or a miss).",
    ),
    "stripe_free_failures": (
        "tensorcache_client_stripe_free_failures",
        (),
        "Replaced stripes that could not be deleted (left to eviction).",
    ),
    "fill_renewals": ("tensorcache_client_fill_renewals", (), "Fill leases renewed."),
    "fill_leases_lost": ("tensorcache_client_fill_leases_lost", (), "Fill leases lost."),
    "fill_overruns": (
        "tensorcache_client_fill_overruns",
        (),
        "Loaders that ran past max_load_s (their lease given up).",
    ),
}
_GAUGES: dict[str, tuple[str, str]] = {
    "near_bytes": ("tensorcache_client_near_cache_bytes", "Bytes held in the near-cache."),
    "watch_connected": (
        "tensorcache_client_watch_connected",
        "1 while the router's event stream is connected (watch mode).",
    ),
    "watch_complete": (
        "tensorcache_client_watch_complete",
        "1 while the event stream says it misses no node (watch mode).",
    ),
    "watch_live": (
        "tensorcache_client_watch_live",
        "1 while near-cache hits are served without asking the owner (watch mode).",
    ),
}
#: Client.metrics() names that are sums of others (exported through those).
DERIVED = frozenset({"gets"})


def _err_key(key: Key) -> tuple[str, ...] | None:
    if isinstance(key, tuple) and len(key) == 3 and key[0] == "err":
        return (str(key[1]), str(key[2]))
    return None


def _hist_key(key: Key) -> tuple[str, ...] | None:
    return (key,) if isinstance(key, str) else None


class ClientCollector:
    """A client's metrics for a Prometheus registry, read when scraped."""

    def __init__(self, client: _Client) -> None:
        self._client = client

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        values = self._client.metrics()
        families: dict[str, CounterMetricFamily] = {}
        for name, (metric, labels, doc) in _COUNTERS.items():
            family = families.get(metric)
            if family is None:
                family = families[metric] = CounterMetricFamily(
                    metric, doc, labels=[k for k, _ in labels]
                )
            family.add_metric([v for _, v in labels], values.get(name, 0))
        yield from families.values()
        for name, (metric, doc) in _GAUGES.items():
            if name in values:
                yield GaugeMetricFamily(metric, doc, value=values[name])
        rec = self._client._timing
        if rec is not None:
            snap = rec.snapshot()
            yield histogram_family(
                "tensorcache_client_request_duration_seconds",
                "Time a call took in the worker, by operation (retries and failovers included).",
                ["op"],
                snap.hists,
                rec.bounds,
                _hist_key,
            )
            yield counter_family(
                "tensorcache_client_errors",
                "Calls that raised, by operation and error type (tensorcache.errors).",
                ["op", "error"],
                snap.counts,
                _err_key,
            )


def serve_metrics(client: Any, port: int = 0, host: str = "127.0.0.1") -> Exporter:
    """Serve ``client``'s metrics at http://host:port/metrics; ``close()`` stops it."""
    return Exporter([ClientCollector(client)], host, port)
