"""A router's Prometheus metrics, read from its state when scraped.

Nothing here is on a request path: the collector reads the membership's
current view and status, the event hub and the view follower's count of
ring changes. Every metric is listed in docs/operations.md.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from tensorcache.router.events import EventHub
from tensorcache.router.follower import ViewFollower
from tensorcache.router.membership import Membership


class RouterCollector:
    def __init__(self, membership: Membership, hub: EventHub, follower: ViewFollower) -> None:
        self._membership = membership
        self._hub = hub
        self._follower = follower

    def describe(self) -> list[Metric]:
        return []  # unchecked registry: names come with collect()

    def collect(self) -> Iterator[Metric]:
        view = self._membership.view()
        status = self._membership.status()
        etcd = status.where != "embedded"
        info = GaugeMetricFamily(
            "tensorcache_router_info",
            "This router: where its membership lives (embedded or etcd).",
            labels=["membership"],
        )
        info.add_metric(["etcd" if etcd else "embedded"], 1)
        yield info
        yield GaugeMetricFamily(
            "tensorcache_router_members", "Nodes in this router's ring.", value=len(view.members)
        )
        yield GaugeMetricFamily(
            "tensorcache_router_ring_epoch", "This router's ring epoch.", value=view.epoch
        )
        yield CounterMetricFamily(
            "tensorcache_router_ring_changes",
            "Ring epochs this router moved to since it started (joins, leaves, expiries, "
            "invalidations).",
            value=self._follower.changes,
        )
        yield GaugeMetricFamily(
            "tensorcache_router_invalidations",
            "Namespace invalidation records in the ring.",
            value=len(view.invalidations),
        )
        yield GaugeMetricFamily(
            "tensorcache_router_up",
            "1 while membership is ok, 0 while degraded (etcd unreachable: joins, leaves "
            "and invalidations fail; the last ring is still served).",
            value=1 if status.state == "ok" else 0,
        )
        if etcd:
            yield GaugeMetricFamily(
                "tensorcache_router_etcd_reachable",
                "1 while this router's etcd answers and its watch is up, else 0.",
                value=1 if status.state == "ok" else 0,
            )
        yield GaugeMetricFamily(
            "tensorcache_router_watchers",
            "Router.Watch streams served now (watch-mode near-caches).",
            value=len(self._hub),
        )
        yield GaugeMetricFamily(
            "tensorcache_router_watcher_lag_events",
            "Events queued for the slowest watcher (it is reset past the queue limit).",
            value=self._hub.lag(),
        )
        yield CounterMetricFamily(
            "tensorcache_router_published_events",
            "Key events accepted from nodes and fanned out to watchers.",
            value=self._hub.published,
        )
