"""Fill leases, with a hand-driven clock."""

from __future__ import annotations

import pytest

from tensorcache.node.fill import FillLeases

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_one_holder_at_a_time_until_commit_release_or_expiry():
    clock = Clock()
    leases = FillLeases(clock)
    assert leases.acquire("k", "a", 10) == (True, 0.0)
    granted, wait = leases.acquire("k", "b", 10)
    assert not granted and 0 < wait <= 0.05
    assert leases.acquire("k", "a", 10)[0]  # the holder may renew
    leases.committed("k")
    assert leases.acquire("k", "b", 10)[0]
    leases.release("k", "a")  # not the holder: no effect
    assert not leases.acquire("k", "c", 10)[0]
    leases.release("k", "b")
    assert leases.acquire("k", "c", 10)[0]
    clock.now += 10.5  # c died: its lease ran out
    assert leases.acquire("k", "d", 10)[0]
    assert (leases.grants, leases.waits) == (4, 2)
