"""The node's ring view: ownership, the previous ring, the handoff window, stale entries."""

from __future__ import annotations

import pytest

from tensorcache.node.rings import RingView
from tensorcache.node.store import Entry
from tensorcache.ring import Ring, RingMember

pytestmark = pytest.mark.unit


def ring(epoch: int, *names: str, replicas: int = 1, **kw) -> Ring:
    members = [RingMember(n, f"addr-{n}", 1) for n in names]
    return Ring(epoch, members, weight_unit=1, replicas=replicas, **kw)


class Clock:
    now = 50.0

    def __call__(self) -> float:
        return self.now


def entry(key: str, stamp: int, kind: int = 0) -> Entry:
    return Entry((kind, key), None, (), 1, 1, stamp)


def test_installs_only_move_forward():
    view = RingView("a")
    assert view.current is None and not view.member()
    assert view.install(ring(5, "a", "b"))
    assert not view.install(ring(5, "a"))
    assert not view.install(ring(4, "a"))
    assert view.current.epoch == 5 and view.member()
    assert view.install(ring(6, "b"))
    assert view.rings.previous.epoch == 5
    assert not view.member()


def test_a_node_outside_its_ring_owns_everything():
    view = RingView("z")
    assert view.owns("k")  # no ring yet
    view.install(ring(1, "a", "b"))
    assert view.owns("k")


def test_owns_follows_the_replica_set():
    r = ring(1, "a", "b", "c", replicas=2)
    view = RingView("a")
    view.install(r)
    for i in range(200):
        key = f"k{i}"
        assert view.owns(key) == ("a" in {m.name for m in r.replica_set(key)})


def test_previous_owners_only_within_the_window_and_for_owned_keys():
    clock = Clock()
    view = RingView("c", window_s=10, clock=clock)
    before, after = ring(1, "a", "b"), ring(2, "a", "b", "c")
    view.install(before)
    view.install(after)
    moved = next(f"k{i}" for i in range(1000) if after.owner(f"k{i}").name == "c")
    kept = next(f"k{i}" for i in range(1000) if after.owner(f"k{i}").name != "c")
    assert [m.name for m in view.previous_owners(moved)] == [before.owner(moved).name]
    assert view.previous_owners(kept) == []  # not ours: not our miss to fill
    assert view.in_window()
    clock.now += 10
    assert not view.in_window()
    assert view.previous_owners(moved) == []


def test_previous_owners_exclude_this_node():
    view = RingView("a")
    view.install(ring(1, "a"))
    view.install(ring(2, "a", "b"))
    key = next(f"k{i}" for i in range(1000) if view.current.owner(f"k{i}").name == "a")
    assert view.previous_owners(key) == []


def test_stale_applies_to_tensors_stamped_before_an_invalidation():
    view = RingView("a")
    view.install(ring(10, "a", invalidations={"m/": 8}))
    assert view.stale(entry("m/w", 7))
    assert not view.stale(entry("m/w", 8))
    assert not view.stale(entry("other", 1))
    assert not view.stale(entry("m/w\x00stripe", 1, kind=1))  # shards follow their manifest
    assert view.invalidated("m/x", 3) and not view.invalidated("m/x", 9)


def test_peers_are_the_other_members_of_both_rings_current_address_first():
    view = RingView("a")
    view.install(ring(1, "a", "b", "old"))
    moved = Ring(2, [RingMember("a", "x", 1), RingMember("b", "b-new", 1)], weight_unit=1)
    view.install(moved)
    assert {(m.name, m.address) for m in view.peers()} == {("b", "b-new"), ("old", "addr-old")}


def test_an_invalidation_stays_in_force_after_the_router_forgets_it():
    # An embedded router restarted (or a record deleted from etcd): the new
    # ring has no table, but what was hidden once stays hidden.
    view = RingView("a")
    view.install(ring(10, "a", invalidations={"m/": 10}))
    assert view.stale(entry("m/x", 9))
    view.install(ring(20, "a"))
    assert view.stale(entry("m/x", 9))
    assert not view.stale(entry("m/x", 15))
    view.install(ring(30, "a", invalidations={"m/": 25}))
    assert view.stale(entry("m/x", 15))
    assert not view.stale(entry("other", 1))


def test_an_invalidation_alone_moves_nothing_and_keeps_the_handoff_window():
    clock = Clock()
    view = RingView("a", clock=clock)
    view.install(ring(1, "a", "b", replicas=2))
    view.install(ring(2, "a", "b", "c", replicas=2))  # c joined: keys moved
    changed_at = view.rings.changed_at
    clock.now += 10
    view.install(ring(3, "a", "b", "c", replicas=2, invalidations={"m/": 3}))
    assert view.rings.previous.epoch == 1  # still the ring before the join
    assert view.rings.changed_at == changed_at
    assert view.invalidated("m/x", 2)


def test_no_handoff_for_a_key_whose_replicas_did_not_change():
    view = RingView("a", clock=Clock())
    view.install(ring(1, "a", "b", "c", replicas=2))
    view.install(ring(2, "a", "b", "c", "d", replicas=2))
    keys = [f"k{i}" for i in range(200)]
    for key in keys:
        before = {m.name for m in ring(1, "a", "b", "c", replicas=2).replica_set(key)}
        now = {m.name for m in view.current.replica_set(key)}
        asked = view.previous_owners(key)
        if "a" not in now or before == now:
            assert asked == []
        else:
            assert {m.name for m in asked} == before - {"a"}
    assert any(view.previous_owners(k) for k in keys)


def test_a_joiner_learns_the_holders_before_it_from_earlier_placements():
    """Issue #8: two joins in a row (3 -> 4 -> 5 members). A key's copy can
    still sit on its owner of two placements ago (not yet pushed on); the
    joiner fetched only the ring just before it, so without the router's
    earlier placements a miss asked the one owner who never had the key."""
    clock = Clock()
    three, four, five = ring(1, "a", "b", "c"), ring(2, "a", "b", "c", "d"), ring(3, *"abcde")
    key = next(
        f"k{i}"
        for i in range(5000)
        if five.owner(f"k{i}").name == "e"
        and four.owner(f"k{i}").name == "d"
        and three.owner(f"k{i}").name != "d"
    )
    alone = RingView("e", clock=clock)
    alone.install(four)
    alone.install(five)
    assert [m.name for m in alone.previous_owners(key)] == ["d"]  # the old blind spot

    view = RingView("e", clock=clock)
    view.install(four, [(three, 0.5)])  # the ring before us, and the one before that
    view.install(five, [(four, 0.0), (three, 0.5)])
    assert [r.epoch for r in view.rings.history] == [1, 2, 3]
    assert [m.name for m in view.previous_owners(key)] == ["d", three.owner(key).name]


def test_earlier_placements_fill_epochs_a_node_skipped():
    clock = Clock()
    view = RingView("a", window_s=10, clock=clock)
    view.install(ring(1, "a"))
    clock.now += 100  # long after: ring 1 was replaced 7 s ago, ring 2 3 s ago
    view.install(ring(3, "a", "c"), [(ring(2, "a", "b"), 3.0), (ring(1, "a"), 7.0)])
    assert [r.epoch for r in view.rings.history] == [1, 2, 3]
    assert view.rings.installed_at == (50.0, clock.now - 7.0, clock.now)
    key = next(
        f"k{i}"
        for i in range(5000)
        if view.current.owner(f"k{i}").name == "a" and ring(2, "a", "b").owner(f"k{i}").name == "b"
    )
    assert [m.name for m in view.previous_owners(key)] == ["b"]
    # The window runs from when this node installed ring 3 (it served ring
    # 1's placement until then), not from the router's change.
    clock.now += 9.9
    assert [m.name for m in view.previous_owners(key)] == ["b"]
    clock.now += 0.1
    assert view.previous_owners(key) == []


def test_earlier_placements_this_node_knows_are_not_added_again():
    view = RingView("a")
    view.install(ring(1, "a"))
    view.install(ring(2, "a", "b"))
    view.install(ring(4, "a", "b", "c"), [(ring(3, "a", "c"), 0.1), (ring(2, "a", "b"), 0.2)])
    assert [r.epoch for r in view.rings.history] == [1, 2, 3, 4]
    assert not view.install(ring(4, "a"), [(ring(3, "a"), 0.0)])  # not newer: nothing at all


def test_back_from_a_gap_the_router_placements_replace_the_stand_in():
    """A paused node the ring dropped: the real placement without it comes from
    the router; the stand-in ring (current less us) only when none reaches back."""
    real = RingView("a")
    real.install(ring(1, "a", "b"))
    real.mark_gap()
    real.install(ring(4, "a", "b"), [(ring(3, "b", "c"), 0.1), (ring(2, "b"), 0.2)])
    assert [(r.epoch, sorted(m.name for m in r.members)) for r in real.rings.history] == [
        (1, ["a", "b"]),
        (2, ["b"]),
        (3, ["b", "c"]),
        (4, ["a", "b"]),
    ]
    short = RingView("a")
    short.install(ring(1, "a", "b"))
    short.mark_gap()
    short.install(ring(9, "a", "b", "c"), [(ring(7, "a", "b", "c"), 0.1)])  # all with us
    assert [(r.epoch, sorted(m.name for m in r.members)) for r in short.rings.history] == [
        (1, ["a", "b"]),
        (7, ["a", "b", "c"]),
        (8, ["b", "c"]),  # the stand-in
        (9, ["a", "b", "c"]),
    ]
