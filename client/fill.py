"""One fill per miss, client side: wait for a fill, or do it under a renewed lease.

Every read-through path calls ``read_through`` with its own ``lookup``,
``load`` and ``store``: ``Client.get_or_load`` today (one tensor), a state
dict or a KV prefix later (many keys under one grant key). The node side is
``node/fill.py``; the wire is ``Node/Fill``.

How it goes
-----------
After a miss the caller asks the key's owner for the fill grant. The owner
grants it to one holder at a time as a *lease* of ``lease_s``:

* the **holder** renews it from a background thread every ``lease_s / 4``
  while ``load`` and ``store`` run, and releases it when they return or
  raise. So a loader may run for minutes and keep its grant, while a holder
  that dies (kill -9, OOM), is cut off from the owner, or whose owner fails
  over stops renewing and its lease lapses within ``lease_s``. Past
  ``max_load_s`` (optional) the holder stops renewing too: the others take
  over a hung loader (which Python cannot interrupt; see ``read_through``).
* **waiters** are told who holds the grant and when its lease ends unless
  renewed. They ask again with capped, jittered exponential backoff (to see
  the value once it is put) and never later than just after that lease's
  end (to take over at once from a holder that stopped renewing). A waiter
  that asks costs one small RPC; it reads the value only once the owner says
  it is there. After ``timeout_s`` a waiter raises ``Unavailable`` naming
  the key and the holder (id, host and pid).

A holder's put is conditional on absence (the store callback's business:
``Client.get_or_load`` uses ``if_version=0``), so a holder that lost its
lease and finishes late never overwrites the value its successor put.
"""

from __future__ import annotations

import logging
import os
import random
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from tensorcache.errors import InvalidArgument, TensorCacheError, Unavailable, VersionConflict
from tensorcache.proto import tensorcache_pb2 as pb

log = logging.getLogger("tensorcache.client")

T = TypeVar("T")

MAX_LEASE_S = 60.0  # the node's MAX_FILL_TTL_MS
MIN_LEASE_S = 0.2
FIRST_POLL_S = 0.02  # a waiter's first pause; doubles up to the cap (lease_s / 4)
# Renewals per lease period: three may be lost or late (a stalled process, a
# slow node) before the lease lapses.
RENEWS_PER_LEASE = 4


class Grants(Protocol):
    """The key owner's fill grants (``Client`` over ``Node/Fill``; a fake in tests)."""

    def ask(
        self, key: str, holder: str, filler: str, lease_ms: int, timeout_s: float
    ) -> pb.FillReply:
        """Ask for (or renew) the grant of ``key``; raises ``Unavailable`` if unreachable."""
        ...

    def release(self, key: str, holder: str, timeout_s: float) -> None: ...


class FillCall(Protocol):
    """One Fill RPC to the key's owner (``Client._fill``)."""

    def __call__(
        self, key: str, holder: str, filler: str, ttl_ms: int, *, release: bool, timeout_s: float
    ) -> pb.FillReply: ...


@dataclass(frozen=True)
class RpcGrants:
    """``Grants`` over one function that sends a FillRequest."""

    call: FillCall

    def ask(
        self, key: str, holder: str, filler: str, lease_ms: int, timeout_s: float
    ) -> pb.FillReply:
        return self.call(key, holder, filler, lease_ms, release=False, timeout_s=timeout_s)

    def release(self, key: str, holder: str, timeout_s: float) -> None:
        self.call(key, holder, "", 0, release=True, timeout_s=timeout_s)


@dataclass(frozen=True)
class FillOptions:
    """How one read-through fills and waits."""

    #: The grant's lease period: how long a dead or cut-off holder blocks the
    #: others. The holder renews every lease_s / 4.
    lease_s: float = 2.0
    #: Stop renewing this long after the grant (None: renew until done): a hung
    #: loader then loses its grant within lease_s and a waiter takes over.
    max_load_s: float | None = None
    #: A waiter raises Unavailable after this long.
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if not MIN_LEASE_S <= self.lease_s <= MAX_LEASE_S:
            raise InvalidArgument(
                f"lease_s must be in [{MIN_LEASE_S}, {MAX_LEASE_S:g}], got {self.lease_s}"
            )
        if self.max_load_s is not None and not self.max_load_s > 0:
            raise InvalidArgument(f"max_load_s must be > 0 or None, got {self.max_load_s}")
        if not self.timeout_s > 0:
            raise InvalidArgument(f"timeout_s must be > 0, got {self.timeout_s}")

    @property
    def rpc_timeout_s(self) -> float:
        # A Fill RPC is tiny; a node that cannot answer within a lease has lost it anyway.
        return max(1.0, self.lease_s)


def describe_self() -> str:
    """Who this process is, for the people reading a waiter's error."""
    return f"{socket.gethostname()} pid {os.getpid()}"


def wait_s(attempt: int, lease_left_s: float | None, lease_s: float, rng: float) -> float:
    """A waiter's pause before asking again (``rng`` uniform in [0, 1)).

    Exponential from FIRST_POLL_S, capped at lease_s / 4, jittered down by up
    to half so waiters spread out; never past just after the current lease's
    end, where the jitter is small (at most lease_s / 20, 50 ms) so a
    takeover is prompt without every waiter asking at the same instant.
    """
    cap = lease_s / 4
    pause = min(cap, FIRST_POLL_S * 2 ** min(attempt, 20)) * (0.5 + rng / 2)
    if lease_left_s is not None and lease_left_s < pause:
        pause = lease_left_s + rng * min(0.05, lease_s / 20)
    return float(pause)


class Renewal:
    """Keeps one holder's lease alive from a background thread until stopped."""

    def __init__(
        self,
        grants: Grants,
        key: str,
        holder: str,
        filler: str,
        options: FillOptions,
        count: Callable[[str], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._grants = grants
        self._key = key
        self._holder = holder
        self._filler = filler
        self._options = options
        self._count = count
        self._clock = clock
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"tensorcache-fill-{holder}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop renewing; waits (boundedly) for an RPC in flight to return.

        A renewal still retrying past the wait (its owner is failing over) may
        land after the caller's release and hold the key for one more lease.
        """
        self._stop.set()
        self._thread.join(self._options.rpc_timeout_s + 1.0)
        if self._thread.is_alive():
            log.warning("fill of %r: a lease renewal is still in flight after stop", self._key)

    def _run(self) -> None:
        try:
            self._renew_until_stopped()
        except Exception:  # a bug: say so rather than let the lease lapse silently
            log.exception("fill of %r: lease renewal failed; the grant will lapse", self._key)

    def _renew_until_stopped(self) -> None:
        o = self._options
        started = last_ok = self._clock()
        failing = False
        period = o.lease_s / RENEWS_PER_LEASE
        sent = time.monotonic()
        # Renewals start a period apart, however long each took (not a period
        # after the last one returned): a slow answer does not delay the next.
        while not self._stop.wait(max(0.0, sent + period - time.monotonic())):
            sent = time.monotonic()
            now = self._clock()
            if o.max_load_s is not None and now - started >= o.max_load_s:
                self._count("fill_overruns")
                log.warning(
                    "fill of %r ran past max_load_s=%gs: no longer renewing its grant; "
                    "another worker takes over within %gs",
                    self._key, o.max_load_s, o.lease_s,
                )  # fmt: skip
                return
            try:
                reply = self._grants.ask(
                    self._key, self._holder, self._filler, round(o.lease_s * 1000), o.rpc_timeout_s
                )
            except TensorCacheError as exc:
                if not failing and self._clock() - last_ok >= o.lease_s:
                    failing = True
                    log.warning(
                        "fill of %r: lease renewals failing for %.1fs (%s); "
                        "another worker may take over",
                        self._key, self._clock() - last_ok, exc,
                    )  # fmt: skip
                continue
            if reply.found:
                return  # the put committed: nothing left to hold
            if reply.granted:
                last_ok, failing = self._clock(), False
                self._count("fill_renewals")
                continue
            self._count("fill_leases_lost")
            log.warning(
                "fill of %r lost its grant (its lease lapsed: a stall, a partition or an owner "
                "failover); holder %s (%s) took it over",
                self._key, reply.holder, reply.filler or "unknown",
            )  # fmt: skip
            return


def read_through(
    key: str,
    *,
    lookup: Callable[[], T | None],
    load: Callable[[], T],
    store: Callable[[T], None],
    grants: Grants,
    options: FillOptions,
    count: Callable[[str], None] = lambda _name: None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    rng: Callable[[], float] = random.random,
) -> T:
    """``lookup()`` if it finds something; else exactly one caller cluster-wide
    runs ``load()`` then ``store(value)`` under the grant of ``key`` while the
    others wait, then look up what it stored.

    The holder returns its loaded value; an exception from ``load`` or
    ``store`` releases the grant at once and propagates. A holder is never
    interrupted: past ``max_load_s`` it only stops renewing (so others take
    over) and still returns its value, and stores it, when ``load`` returns.
    Waiters raise ``Unavailable`` after ``options.timeout_s``.
    """
    value = lookup()
    if value is not None:
        return value
    holder = secrets.token_hex(8)
    filler = describe_self()
    deadline = clock() + options.timeout_s
    lease_ms = round(options.lease_s * 1000)
    waiting_on: pb.FillReply | None = None  # the last refusal: who holds the grant
    error: TensorCacheError | None = None
    for attempt in range(1_000_000):  # bounded by the deadline long before
        lease_left: float | None = None
        try:
            reply = grants.ask(key, holder, filler, lease_ms, options.rpc_timeout_s)
            value = lookup() if reply.found else None
        except Unavailable as exc:  # the owner is failing over: the ring moves on
            error = exc
        else:
            error = None
            if value is not None:
                return value
            if reply.granted:
                break
            if not reply.found:
                waiting_on = reply
                lease_left = reply.lease_left_ms / 1000
                count("fill_waits")
            # else: found, then gone (evicted or deleted meanwhile): ask again soon.
        now = clock()
        if now >= deadline:
            raise Unavailable(_gave_up(key, options.timeout_s, waiting_on, error))
        sleep(min(wait_s(attempt, lease_left, options.lease_s, rng()), deadline - now))
    else:
        raise Unavailable(_gave_up(key, options.timeout_s, waiting_on, error))
    if waiting_on is not None:
        count("fill_takeovers")
        log.info(
            "fill of %r: granted after holder %s (%s) released it or its lease lapsed",
            key, waiting_on.holder, waiting_on.filler or "unknown",
        )  # fmt: skip
    return _hold(key, holder, filler, load, store, grants, options, count, clock)


def _hold(
    key: str,
    holder: str,
    filler: str,
    load: Callable[[], T],
    store: Callable[[T], None],
    grants: Grants,
    options: FillOptions,
    count: Callable[[str], None],
    clock: Callable[[], float],
) -> T:
    renewal = Renewal(grants, key, holder, filler, options, count, clock)
    renewal.start()
    try:
        value = load()
        store(value)  # its commit ends the grant on the owner
    finally:
        renewal.stop()  # before releasing: no renewal may land after the release
        try:
            grants.release(key, holder, options.rpc_timeout_s)
        except TensorCacheError as exc:  # the lease lapses by itself within lease_s
            log.info("fill of %r: release failed (%s); its lease lapses by itself", key, exc)
    count("loads")
    return value


def store_if_absent(
    put: Callable[[T], object], key: str, count: Callable[[str], None]
) -> Callable[[T], None]:
    """A ``store`` for ``read_through`` over a put conditional on absence.

    ``VersionConflict`` means someone else already put the key (this holder
    lost its grant and a successor finished first, or a plain put raced the
    fill): theirs is kept, and the holder still returns what it loaded.
    """

    def store(value: T) -> None:
        try:
            put(value)
        except VersionConflict:
            count("fill_conflicts")
            log.info("fill of %r: already put by another worker; keeping theirs", key)

    return store


def _gave_up(
    key: str, timeout_s: float, waiting_on: pb.FillReply | None, error: TensorCacheError | None
) -> str:
    msg = f"gave up waiting for {key!r} to be filled after {timeout_s:g}s"
    if waiting_on is not None:
        msg += (
            f": holder {waiting_on.holder} ({waiting_on.filler or 'unknown filler'}) is loading"
            f" it, its lease {waiting_on.lease_left_ms / 1000:.1f}s from lapsing when last asked"
        )
    if error is not None:
        msg += f"; last error: {error}"
    return msg
