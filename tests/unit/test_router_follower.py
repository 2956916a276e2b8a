"""The view follower: new invalidations and epochs reach watchers; status reaches health."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from tensorcache.ring import RingMember
from tensorcache.router.events import Batch, EventHub, Watcher
from tensorcache.router.follower import ViewFollower
from tensorcache.router.membership import EmbeddedMembership, MembershipStatus

pytestmark = pytest.mark.unit


@dataclass
class Parts:
    membership: EmbeddedMembership
    hub: EventHub
    statuses: list[MembershipStatus] = field(default_factory=list)
    heard: threading.Event = field(default_factory=threading.Event)

    def on_status(self, status: MembershipStatus) -> None:
        self.statuses.append(status)
        self.heard.set()


@pytest.fixture
def parts() -> Iterator[Parts]:
    p = Parts(EmbeddedMembership(30.0), EventHub())
    follower = ViewFollower(p.membership, p.hub, p.on_status, interval_s=0.01).start()
    try:
        yield p
    finally:
        follower.stop()
        p.membership.close()


def next_non_empty(watcher: Watcher, limit: int = 500) -> Batch:
    for _ in range(limit):
        batch = watcher.next_batch(keepalive_s=0.05, coalesce_s=0.0)
        if batch != Batch():
            return batch
    pytest.fail("no batch with content")


def test_a_new_invalidation_reaches_watchers(parts: Parts) -> None:
    watcher = parts.hub.subscribe()
    epoch = parts.membership.invalidate("models/")
    assert next_non_empty(watcher) == Batch(invalidations=(("models/", epoch),))


def test_a_member_change_wakes_watchers_with_no_records(parts: Parts) -> None:
    watcher = parts.hub.subscribe()
    got: list[Batch | None] = []
    t = threading.Thread(target=lambda: got.append(watcher.next_batch(keepalive_s=30.0)))
    t.start()
    parts.membership.register(RingMember("n0", "127.0.0.1:1", 1 << 30))
    t.join(10)
    assert not t.is_alive() and got == [Batch()]


def test_status_is_handed_on(parts: Parts) -> None:
    assert parts.heard.wait(10)
    assert parts.statuses[-1] == MembershipStatus("ok", "", "embedded")
