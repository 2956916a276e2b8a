"""The lease guard (node/lease.py): after a stall past the lease, serve nothing
until a heartbeat begun after the stall has finished; otherwise never hold a request."""

from __future__ import annotations

import threading

import pytest

from tensorcache.errors import Unavailable
from tensorcache.node.lease import STALL_S, LeaseGuard

pytestmark = pytest.mark.unit

TTL = 3.0


class Clock:
    def __init__(self, step: float = 0.0) -> None:
        self.now = 100.0
        self.step = step  # added at every read: time passes while a request waits

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def heartbeat(guard: LeaseGuard, clock: Clock, *, known: bool = True) -> None:
    started = guard.cycle_started()
    clock.now += 0.001
    guard.cycle_done(started, renewed=known)


def test_serves_while_the_lease_is_fresh_even_after_a_short_stall() -> None:
    clock = Clock()
    guard = LeaseGuard(TTL, clock=clock)
    heartbeat(guard, clock)
    clock.now += TTL / 2  # a stall, but the router cannot have dropped us yet
    guard.check()
    assert guard.stalls == 1


def test_serves_when_the_router_is_unreachable_but_the_process_ran() -> None:
    clock = Clock()
    guard = LeaseGuard(TTL, clock=clock)
    heartbeat(guard, clock)
    for _ in range(int(3 * TTL / 0.1)):  # the ticker keeps looking; renewals fail
        clock.now += 0.1
        guard.observe()
    heartbeat(guard, clock, known=False)
    assert guard.silent_s() > TTL
    guard.check()  # availability: the node keeps serving (docs/operations.md)
    assert guard.stalls == 0


def test_after_a_stall_past_the_lease_a_request_waits_for_a_new_heartbeat() -> None:
    clock = Clock()
    guard = LeaseGuard(TTL, clock=clock)
    heartbeat(guard, clock)
    clock.now += TTL + 2  # SIGSTOP; the request is the first to run after it
    served = threading.Event()

    def request() -> None:
        guard.check()
        served.set()

    t = threading.Thread(target=request)
    t.start()
    assert not served.wait(0.2)  # held (bounded in real time by the join below)
    heartbeat(guard, clock, known=False)  # the router forgot us; gap marked, re-registered
    t.join(5)
    assert served.is_set() and guard.stalls == 1


def test_a_heartbeat_begun_before_the_stall_does_not_release_requests() -> None:
    clock = Clock()
    guard = LeaseGuard(TTL, clock=clock)
    started = guard.cycle_started()  # in flight when the process was stopped
    clock.now += TTL + 2
    guard.cycle_done(started, renewed=True)  # its answer predates the stall
    assert guard.silent_s() > TTL  # and it does not count as a renewal since
    clock.step = 1.0  # time passes while the request waits: past wait_s at once
    guard.wait_s = 0.5
    with pytest.raises(Unavailable, match="lease"):
        guard.check()


def test_a_stall_shorter_than_the_threshold_is_none() -> None:
    clock = Clock()
    guard = LeaseGuard(TTL, clock=clock)
    clock.now += STALL_S * 0.9
    guard.observe()
    assert guard.stalls == 0
