"""Fill leases (node/fill.py) and the client's renew-and-wait loop (client/fill.py),
with a hand-driven clock and an in-process fake of the key's owner."""

from __future__ import annotations

import threading

import pytest

from tensorcache.client.fill import FillOptions, read_through, wait_s
from tensorcache.errors import InvalidArgument, Unavailable
from tensorcache.node.fill import FillLeases
from tensorcache.proto import tensorcache_pb2 as pb

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# ------------------------------------------------------------------ node side
def test_one_holder_at_a_time_until_commit_release_or_expiry():
    clock = Clock()
    leases = FillLeases(clock)
    assert leases.acquire("k", "a", 10).granted
    refused = leases.acquire("k", "b", 10)
    assert not refused.granted and refused.holder == "a" and refused.left_s == 10
    leases.committed("k")
    assert leases.acquire("k", "b", 10).granted
    leases.release("k", "a")  # not the holder: no effect
    assert not leases.acquire("k", "c", 10).granted
    leases.release("k", "b")
    assert leases.acquire("k", "c", 10).granted
    clock.now += 10.5  # c died: its lease ran out
    assert leases.acquire("k", "d", 10).granted
    assert (leases.grants, leases.waits) == (4, 2)


def test_a_renewed_lease_outlives_many_periods_and_lapses_one_period_after_the_last():
    clock = Clock()
    leases = FillLeases(clock)
    assert leases.acquire("k", "a", 2, "host-a pid 1").granted
    for _ in range(30):  # 20 s of loading (10 periods), renewed every 2/3 s
        clock.now += 2 / 3
        waiter = leases.acquire("k", "w", 2)
        assert not waiter.granted
        assert (waiter.holder, waiter.filler) == ("a", "host-a pid 1")
        assert waiter.left_s == pytest.approx(2 - 2 / 3)
        assert leases.acquire("k", "a", 2).granted  # renewal
    assert leases.renewals == 30 and leases.grants == 1
    clock.now += 1.9  # the holder died right after its last renewal
    assert leases.acquire("k", "w", 2).left_s == pytest.approx(0.1)
    clock.now += 0.2
    took = leases.acquire("k", "w", 2, "host-w pid 2")
    assert took.granted and took.filler == "host-w pid 2"
    late = leases.acquire("k", "a", 2)  # the old holder's renewal comes back
    assert not late.granted and late.holder == "w"
    assert leases.holder("k") is not None and leases.holder("k").holder == "w"  # type: ignore[union-attr]


def test_a_lapsed_lease_nobody_took_is_renewed_by_its_holder():
    clock = Clock()
    leases = FillLeases(clock)
    leases.acquire("k", "a", 1)
    clock.now += 5  # renewals stalled (a slow network), but nobody else asked
    assert leases.holder("k") is None
    assert leases.acquire("k", "a", 1).granted
    assert leases.grants == 1  # still the same fill


def test_acquire_refuses_a_non_positive_period():
    with pytest.raises(ValueError):
        FillLeases().acquire("k", "a", 0)


# ------------------------------------------------------------------ client side
class FakeOwner:
    """The key's owner in-process: FillLeases plus a dict, on a shared clock."""

    def __init__(self, clock: Clock) -> None:
        self.leases = FillLeases(clock)
        self.values: dict[str, int] = {}
        self.asks: list[str] = []
        self.down = False
        self.lock = threading.Lock()

    def ask(self, key: str, holder: str, filler: str, lease_ms: int, timeout_s: float):
        with self.lock:
            self.asks.append(holder)
            if self.down:
                raise Unavailable("owner down")
            if key in self.values:
                return pb.FillReply(found=True)
            a = self.leases.acquire(key, holder, lease_ms / 1000, filler)
            return pb.FillReply(
                granted=a.granted,
                holder=a.holder,
                filler=a.filler,
                lease_left_ms=max(1, round(a.left_s * 1000)),
            )

    def release(self, key: str, holder: str, timeout_s: float) -> None:
        self.leases.release(key, holder)


def test_a_waiter_sleeps_until_just_after_a_dead_holders_lease_then_takes_over():
    clock = Clock()
    owner = FakeOwner(clock)
    owner.leases.acquire("k", "dead", 2.0, "host-x pid 9")  # renewed once, then killed
    sleeps: list[float] = []

    def sleep(s: float) -> None:
        sleeps.append(s)
        clock.now += s

    got = read_through(
        "k",
        lookup=lambda: owner.values.get("k"),
        load=lambda: 7,
        store=lambda v: owner.values.__setitem__("k", v),
        grants=owner,
        options=FillOptions(lease_s=2.0),
        sleep=sleep,
        clock=clock,
        rng=lambda: 0.5,
    )
    assert got == 7 and owner.values == {"k": 7}
    took_over_after = sum(sleeps)
    assert 2.0 <= took_over_after <= 2.0 + 0.05  # just after the lease, not a poll period later
    assert all(s <= 2.0 / 4 for s in sleeps[:-1])  # capped backoff while it was alive
    assert len(sleeps) < 20  # backoff, not a busy poll


def test_a_waiter_times_out_naming_the_key_and_the_filler():
    clock = Clock()
    owner = FakeOwner(clock)
    owner.leases.acquire("k", "h0ld3r", 60.0, "gpu-7 pid 4242")

    def sleep(s: float) -> None:
        clock.now += s
        owner.leases.acquire("k", "h0ld3r", 60.0, "gpu-7 pid 4242")  # it keeps renewing

    with pytest.raises(Unavailable) as info:
        read_through(
            "k",
            lookup=lambda: None,
            load=lambda: 1,
            store=lambda v: None,
            grants=owner,
            options=FillOptions(lease_s=2.0, timeout_s=5.0),
            sleep=sleep,
            clock=clock,
        )
    msg = str(info.value)
    assert "'k'" in msg and "h0ld3r" in msg and "gpu-7 pid 4242" in msg
    assert 105.0 <= clock.now <= 105.0 + 1e-6  # gave up at the deadline, not after


def test_a_waiter_rides_out_an_unreachable_owner_until_its_deadline():
    clock = Clock()
    owner = FakeOwner(clock)
    owner.down = True

    def sleep(s: float) -> None:
        clock.now += s
        if clock.now > 103:
            owner.down = False  # the ring moved on: a new owner with no lease

    got = read_through(
        "k",
        lookup=lambda: owner.values.get("k"),
        load=lambda: 3,
        store=lambda v: owner.values.__setitem__("k", v),
        grants=owner,
        options=FillOptions(lease_s=2.0, timeout_s=30.0),
        sleep=sleep,
        clock=clock,
    )
    assert got == 3


def test_a_failing_loader_releases_at_once_and_raises():
    owner = FakeOwner(Clock())

    def broken() -> int:
        raise RuntimeError("storage is down")

    with pytest.raises(RuntimeError, match="storage is down"):
        read_through(
            "k",
            lookup=lambda: None,
            load=broken,
            store=lambda v: None,
            grants=owner,
            options=FillOptions(),
        )
    assert owner.leases.holder("k") is None  # released, not left to lapse


def test_the_holder_renews_in_the_background_while_loading():
    """Real time, short lease: the loader runs 4 periods; a waiter asking all along
    is refused every time, and the holder's renewal thread is gone afterwards."""
    clock = Clock()
    owner = FakeOwner(clock)
    lease = 0.3
    released = threading.Event()
    refused: list[bool] = []

    def load() -> int:
        # Drive the owner's clock a third of a period at a time, waiting each
        # time for the renewal thread to renew (bounded waits, no fixed sleeps).
        for _ in range(12):
            seen = len(owner.asks)
            clock.now += lease / 3
            refused.append(not owner.ask("k", "waiter", "w", 300, 1).granted)
            for _ in range(400):
                if len(owner.asks) > seen + 1 or released.wait(0.005):
                    break
        return 5

    threads_before = threading.active_count()
    got = read_through(
        "k",
        lookup=lambda: owner.values.get("k"),
        load=load,
        store=lambda v: owner.values.__setitem__("k", v),
        grants=owner,
        options=FillOptions(lease_s=lease),
        clock=clock,
    )
    assert got == 5 and all(refused) and len(refused) == 12
    assert owner.leases.renewals >= 6
    assert threading.active_count() <= threads_before


def test_past_max_load_s_the_holder_stops_renewing_so_a_waiter_takes_over():
    clock = Clock()
    owner = FakeOwner(clock)
    lease = 0.3
    counts: list[str] = []
    took_over_at: list[float] = []

    def hung_load() -> int:
        start = clock.now
        for _ in range(100):  # 100 thirds of a period: far past max_load_s
            seen = len(owner.asks)
            clock.now += lease / 3
            if owner.ask("k", "waiter", "w", 300, 1).granted:
                took_over_at.append(clock.now - start)
                break
            for _ in range(100):  # until the holder renews (it stops past max_load_s)
                if len(owner.asks) > seen + 1:
                    break
                threading.Event().wait(0.005)
        return 9

    got = read_through(
        "k",
        lookup=lambda: owner.values.get("k"),
        load=hung_load,
        store=lambda v: owner.values.__setitem__("k", v),
        grants=owner,
        options=FillOptions(lease_s=lease, max_load_s=1.0),
        clock=clock,
        count=counts.append,
    )
    assert "fill_overruns" in counts
    assert took_over_at and 1.0 <= took_over_at[0] <= 1.0 + 2 * lease  # not before max_load_s
    assert got == 9  # the hung loader, once it returns, still returns its value


def test_options_are_checked():
    with pytest.raises(InvalidArgument):
        FillOptions(lease_s=0)
    with pytest.raises(InvalidArgument):
        FillOptions(lease_s=600)
    with pytest.raises(InvalidArgument):
        FillOptions(max_load_s=0)
    with pytest.raises(InvalidArgument):
        FillOptions(timeout_s=-1)


def test_wait_s_backs_off_capped_and_stops_at_the_lease_end():
    pauses = [wait_s(i, None, 2.0, 0.999) for i in range(12)]
    assert pauses == sorted(pauses) and pauses[-1] <= 0.5
    assert wait_s(0, None, 2.0, 0.0) == pytest.approx(0.01)  # jitter halves at most
    assert wait_s(10, 0.1, 2.0, 0.0) == pytest.approx(0.1)
    assert 0.1 <= wait_s(10, 0.1, 2.0, 0.999) <= 0.15
