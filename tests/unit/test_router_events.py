"""The key-event hub: fan-out, ordering, coalescing, overflow resets, keepalives, close."""

from __future__ import annotations

import threading

import pytest

from tensorcache.errors import CapacityExceeded, Unavailable
from tensorcache.router.events import Batch, EventHub

pytestmark = pytest.mark.unit

NOW = {"keepalive_s": 0.0, "coalesce_s": 0.0}  # never wait: what is queued right now


def test_every_watcher_gets_every_event_in_order() -> None:
    hub = EventHub()
    a, b = hub.subscribe(), hub.subscribe()
    hub.publish([(b"k1", 1), (b"k2", 2)])
    hub.publish([(b"k1", 0)])
    for w in (a, b):
        assert w.next_batch(**NOW) == Batch(keys=((b"k1", 1), (b"k2", 2), (b"k1", 0)))
    assert hub.published == 3


def test_a_watcher_hears_only_what_came_after_it_subscribed() -> None:
    hub = EventHub()
    hub.publish([(b"early", 1)])
    w = hub.subscribe()
    hub.publish([(b"late", 2)])
    assert w.next_batch(**NOW).keys == ((b"late", 2),)


def test_quiet_stream_gives_an_empty_keepalive() -> None:
    w = EventHub().subscribe()
    assert w.next_batch(**NOW) == Batch()


def test_epoch_change_wakes_with_new_invalidations_and_alone() -> None:
    hub = EventHub()
    w = hub.subscribe()
    hub.publish([(b"k", 5)])
    hub.epoch_changed([("models/", 42)])
    assert w.next_batch(**NOW) == Batch(keys=((b"k", 5),), invalidations=(("models/", 42),))
    hub.epoch_changed()
    got = w.next_batch(keepalive_s=5.0, coalesce_s=0.0)  # returns at once: woken
    assert got == Batch()


def test_batches_are_bounded_and_the_rest_follows() -> None:
    hub = EventHub()
    w = hub.subscribe()
    hub.publish([(str(i).encode(), i + 1) for i in range(10)])
    first = w.next_batch(max_batch=4, **NOW)
    second = w.next_batch(max_batch=100, **NOW)
    assert [k for k, _ in first.keys] == [b"0", b"1", b"2", b"3"]
    assert [k for k, _ in second.keys] == [str(i).encode() for i in range(4, 10)]


def test_overflow_drops_the_queue_and_resets_only_that_watcher() -> None:
    hub = EventHub(max_queue=3)
    slow, fast = hub.subscribe(), hub.subscribe()
    hub.publish([(b"a", 1), (b"b", 1)])
    assert fast.next_batch(**NOW).keys == ((b"a", 1), (b"b", 1))
    hub.publish([(b"c", 1), (b"d", 1)])  # slow now holds 4 > 3
    assert slow.next_batch(**NOW) == Batch(reset=True)
    assert slow.resets == 1
    assert fast.next_batch(**NOW).keys == ((b"c", 1), (b"d", 1))
    # After the reset, the slow watcher starts over with what comes next.
    hub.publish([(b"e", 1)])
    assert slow.next_batch(**NOW).keys == ((b"e", 1),)


def test_watcher_limit() -> None:
    hub = EventHub(max_watchers=1)
    w = hub.subscribe()
    with pytest.raises(CapacityExceeded):
        hub.subscribe()
    hub.unsubscribe(w)
    hub.subscribe()
    assert len(hub) == 1


def test_close_ends_every_stream_and_refuses_new_ones() -> None:
    hub = EventHub()
    w = hub.subscribe()
    got: list[Batch | None] = []
    t = threading.Thread(target=lambda: got.append(w.next_batch(keepalive_s=30.0)))
    t.start()
    hub.close()
    t.join(10)
    assert not t.is_alive() and got == [None]
    with pytest.raises(Unavailable):
        hub.subscribe()


def test_a_waiting_watcher_wakes_for_a_publish() -> None:
    hub = EventHub()
    w = hub.subscribe()
    got: list[Batch | None] = []
    t = threading.Thread(target=lambda: got.append(w.next_batch(keepalive_s=30.0)))
    t.start()
    hub.publish([(b"k", 7)])
    t.join(10)
    assert not t.is_alive() and got == [Batch(keys=((b"k", 7),))]


def test_bad_settings() -> None:
    with pytest.raises(ValueError):
        EventHub(max_queue=0)
    with pytest.raises(ValueError):
        EventHub(max_watchers=-1)


def test_a_node_that_lost_events_resets_every_watcher() -> None:
    hub = EventHub()
    a, b = hub.subscribe(), hub.subscribe()
    hub.publish([(b"k", 1)], node="n1")
    hub.publish([(b"k", 2)], node="n1", lost=True)  # it dropped some before this
    for w in (a, b):
        assert w.next_batch(**NOW) == Batch(reset=True)
        assert w.next_batch(**NOW) == Batch()  # nothing stale left queued


def test_complete_only_while_every_node_is_heard_from() -> None:
    hub = EventHub()
    # A router that just started has heard nobody: incomplete, no grace.
    assert not hub.complete(["n1", "n2"], silence_s=60)
    hub._started -= 120  # it has run a while: a node new to the ring gets a grace period
    assert hub.complete(["n3"], silence_s=60)
    assert not hub.complete(["n1", "n2"], silence_s=0)
    hub.publish([], node="n1")  # a keepalive
    hub.publish([(b"k", 1)], node="n2")
    assert hub.complete(["n1", "n2"], silence_s=60)
    assert not hub.complete(["n1", "n2", "elsewhere"], silence_s=0)
    assert hub.complete([], silence_s=0)
