"""Health of the etcd-backed membership: is the watch up, did the last etcd call work.

Two facts, each written by one side: the watch loop (router/etcd_watch.py)
says whether it is synchronised, and every etcd call made for a node, an
invalidation or the router's announcement (router/etcd_conn.py) says
whether it worked. Either failing makes the membership degraded; the watch
coming back (or its liveness probe getting an answer) clears an older
failed call, since etcd answers again. Plain attribute writes: readers may
see one fact a moment before the other, which is all ``status()`` needs.
"""

from __future__ import annotations

from tensorcache.errors import Unavailable
from tensorcache.router.membership import MembershipStatus


class EtcdHealth:
    def __init__(self, url: str) -> None:
        self.url = url
        #: Times the watch loop failed and reconnected (each one is logged).
        self.watch_failures = 0
        self._watch_error: str | None = "not synchronised yet"
        self._call_error: str | None = None

    def call_ok(self) -> None:
        self._call_error = None

    def call_failed(self, message: str) -> Unavailable:
        """Record a failed etcd call; returns the error for the caller to raise."""
        self._call_error = message
        return Unavailable(message)

    def watch_up(self) -> None:
        """The watch is synchronised again (an older failed call is history too)."""
        self._watch_error = None
        self._call_error = None

    def watch_failed(self, message: str) -> int:
        """Record a watch failure; returns how many there have been."""
        self.watch_failures += 1
        self._watch_error = message
        return self.watch_failures

    def status(self) -> MembershipStatus:
        problem = self._watch_error or self._call_error
        if problem is None:
            return MembershipStatus("ok", "", self.url)
        return MembershipStatus("degraded", problem, self.url)
