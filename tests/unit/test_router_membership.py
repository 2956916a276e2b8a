"""Embedded membership's invalidation table, view waits and status; prefix checks."""

from __future__ import annotations

import threading

import pytest

from tensorcache.errors import InvalidArgument
from tensorcache.ring import RingMember
from tensorcache.router.etcd_membership import decode_prefix, encode_prefix
from tensorcache.router.membership import EmbeddedMembership, MembershipView, ViewCell
from tensorcache.router.server import RouterConfig
from tensorcache.router.service import check_prefix

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_invalidate_records_the_new_epoch() -> None:
    m = EmbeddedMembership(3.0, clock=Clock())
    before = m.view().epoch
    e1 = m.invalidate("models/a/")
    assert e1 == before + 1
    view = m.view()
    assert view.epoch == e1
    assert view.invalidation_table() == {"models/a/": e1}


def test_same_prefix_again_replaces_with_the_newer_epoch() -> None:
    m = EmbeddedMembership(3.0, clock=Clock())
    e1 = m.invalidate("p/")
    e2 = m.invalidate("")
    e3 = m.invalidate("p/")
    assert e1 < e2 < e3
    assert m.view().invalidations == (("", e2), ("p/", e3))


def test_invalidations_survive_member_changes() -> None:
    clock = Clock()
    m = EmbeddedMembership(3.0, clock=clock)
    e = m.invalidate("x/")
    m.register(RingMember("n0", "127.0.0.1:1", 1 << 30))
    clock.now = 10.0  # n0's lease runs out
    view = m.view()
    assert view.members == () and view.epoch > e
    assert view.invalidation_table() == {"x/": e}


def test_wait_view_returns_once_the_epoch_moves() -> None:
    m = EmbeddedMembership(3.0, clock=Clock())
    start = m.view().epoch
    got: list[MembershipView] = []
    t = threading.Thread(target=lambda: got.append(m.wait_view(start, 30.0)))
    t.start()
    m.invalidate("")
    t.join(10)
    assert not t.is_alive() and got[0].epoch == start + 1


def test_wait_view_times_out_with_the_current_view() -> None:
    cell = ViewCell(MembershipView(5, ()))
    assert cell.wait(5, 0.0).epoch == 5


def test_embedded_status_is_ok() -> None:
    status = EmbeddedMembership(3.0).status()
    assert (status.state, status.where) == ("ok", "embedded")


@pytest.mark.parametrize("prefix", ["", "a", "models/llama/", "ü/\N{SNOWMAN}/", "x" * 1024])
def test_prefix_segments_round_trip(prefix: str) -> None:
    segment = encode_prefix(prefix)
    assert b"/" not in segment
    assert decode_prefix(segment) == prefix


@pytest.mark.parametrize("prefix", ["", "models/", "é" * 512])
def test_good_prefixes(prefix: str) -> None:
    check_prefix(prefix)


@pytest.mark.parametrize(
    ("prefix", "words"),
    [("x" * 1025, "1025 bytes"), ("é" * 513, "1026 bytes"), ("a\0b", "NUL"), ("\ud800", "UTF-8")],
)
def test_bad_prefixes(prefix: str, words: str) -> None:
    with pytest.raises(InvalidArgument, match=words):
        check_prefix(prefix)


def test_router_config_replicas() -> None:
    assert RouterConfig(replicas=3).replicas == 3
    with pytest.raises(ValueError, match="replicas must be >= 1"):
        RouterConfig(replicas=0)


def _member(name: str) -> RingMember:
    return RingMember(name, f"127.0.0.1:{len(name)}", 1 << 30)


def test_a_view_carries_the_placements_before_it_newest_first() -> None:
    """Joins in a row: each view lists the member sets it replaced (issue #8)."""
    clock = Clock()
    cell = ViewCell(MembershipView(1, (_member("a"),)), clock=clock)
    clock.now = 10.0
    cell.set(MembershipView(2, (_member("a"), _member("b"))))
    clock.now = 12.0
    cell.set(MembershipView(3, (_member("a"), _member("b")), (("p/", 3),)))  # invalidation only
    cell.set(MembershipView(4, (_member("a"), _member("b"), _member("c"))))
    earlier = cell.get().earlier
    assert [(p.epoch, [m.name for m in p.members], p.ended) for p in earlier] == [
        (3, ["a", "b"], 12.0),
        (1, ["a"], 10.0),
    ]
    assert cell.get().invalidations == ()  # the view itself is what was set


def test_earlier_placements_are_bounded() -> None:
    from tensorcache.router.membership import EARLIER_PLACEMENTS

    cell = ViewCell(MembershipView(1, (_member("n0"),)))
    for i in range(1, EARLIER_PLACEMENTS + 5):
        cell.set(MembershipView(i + 1, tuple(_member(f"n{j}") for j in range(i + 1))))
    earlier = cell.get().earlier
    assert len(earlier) == EARLIER_PLACEMENTS
    assert earlier[0].epoch == EARLIER_PLACEMENTS + 4  # the one just replaced


def test_embedded_membership_views_remember_joins() -> None:
    m = EmbeddedMembership(3.0, clock=Clock())
    m.register(_member("a"))
    first = m.view().epoch
    m.register(_member("b"))
    m.register(_member("c"))
    assert [p.epoch for p in m.view().earlier] == [first + 1, first]
