"""Follows the router's membership view: feeds the event hub, keeps health current.

One daemon thread. Each new view's invalidation records go to every watcher
as soon as the view holds them (and an epoch change alone still wakes them,
so watchers learn the epoch without waiting for a keepalive). Each turn also
reads the membership's status and hands it to ``on_status`` (the router sets
its grpc health from it) and logs every change of state.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from tensorcache.router.events import EventHub
from tensorcache.router.membership import Membership, MembershipStatus

log = logging.getLogger("tensorcache.router")


class ViewFollower:
    def __init__(
        self,
        membership: Membership,
        hub: EventHub,
        on_status: Callable[[MembershipStatus], None] | None = None,
        *,
        interval_s: float = 0.2,
    ) -> None:
        self._membership = membership
        self._hub = hub
        self._on_status = on_status
        self._interval_s = interval_s
        self._last = membership.view()  # changes from here on are followed
        #: Ring epochs this router moved to since it started (membership
        #: changes and invalidations): the metric tensorcache_router_ring_changes_total.
        self.changes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="view-follower", daemon=True)

    def start(self) -> ViewFollower:
        self._thread.start()
        return self

    def _loop(self) -> None:
        last = self._last
        state = ""
        while not self._stop.is_set():
            try:
                view = self._membership.wait_view(last.epoch, self._interval_s)
                if view.epoch != last.epoch:
                    seen = set(last.invalidations)
                    self._hub.epoch_changed(i for i in view.invalidations if i not in seen)
                    last = view
                    self.changes += 1  # this thread is its only writer
                status = self._membership.status()
                if status.state != state:
                    if status.state == "ok":
                        log.info("membership %s: ok", status.where)
                    else:
                        log.warning("membership %s: degraded: %s", status.where, status.detail)
                    state = status.state
                if self._on_status is not None:
                    self._on_status(status)
            except Exception:  # a bug here must not silently stop the hub's feed
                log.exception("view follower failed; continuing")
                self._stop.wait(self._interval_s)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
