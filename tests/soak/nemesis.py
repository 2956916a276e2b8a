"""The nemesis: one fault at a time, healed and recovered from before the next.

Kinds (each on one target drawn by the seeded generator):

* ``kill9``: SIGKILL a node; restart it under the same name, at once or
  after the ring dropped it (its lease ran out);
* ``pause``: SIGSTOP a node until the ring dropped it (past the lease TTL),
  then SIGCONT; it must register again;
* ``drain``: SIGTERM a node (it leaves and hands its entries over), must
  exit 0; restart it under the same name;
* ``join_leave``: a fifth node joins; the next time, it leaves by drain;
* ``etcd_restart``, ``router_restart`` (SIGTERM, or SIGKILL one time in three);
* ``latency``, ``bandwidth``, ``reset``, ``blackhole``: the node's proxy routes.

At most one node is down at any moment (R - 1 with R = 2): a killed,
paused, draining or not-yet-restarted node counts as down, and so does a
black-holed one, and so does a node restarted empty until its copies are made
again. After each fault the nemesis waits (bounded) until the ring lists
exactly the live nodes where they live, then until every member reports its
re-replication done (``pending`` 0, nothing demoted: ``wait_repaired``), then
idles a random gap before the next. Without the second wait a kill -9 of a
key's other holder seconds after the first holder restarted empty took the
last copy (the 30-minute run at 132bbe2 lost 126 keys that way: a loss no
R = 2 store can avoid, and not the "one crash at a time" the guarantee
promises). Kinds are drawn as shuffled rounds, every kind once per
round, so a short run still sees most of them. ``SOAK_KINDS`` (a comma list)
narrows the draw to some kinds, to hammer one interleaving (a pause then a
kill of the other holder, say) many times in a short run.
"""

from __future__ import annotations

import random
import signal
import time
from collections import Counter
from typing import Any

import grpc

from .cluster import SoakCluster
from .proxy import Faults

KINDS = (
    "kill9",
    "pause",
    "drain",
    "join_leave",
    "etcd_restart",
    "router_restart",
    "latency",
    "bandwidth",
    "reset",
    "blackhole",
)
EXTRA_NODE = "node-4"
RECOVER_S = 60.0  # bound on the wait for the ring after a fault
REPAIR_S = 120.0  # bound on the wait for re-replication after a fault
GAP_S = (2.0, 5.0)  # idle between faults (the schedule's pace, not a synchronisation)


class Nemesis:
    def __init__(
        self,
        cluster: SoakCluster,
        rng: random.Random,
        base_nodes: list[str],
        kinds: tuple[str, ...] = KINDS,
    ) -> None:
        unknown = sorted(set(kinds) - set(KINDS))
        if unknown or not kinds:
            known = ", ".join(KINDS)
            raise ValueError(f"SOAK_KINDS: unknown fault kinds {unknown}; known: {known}")
        self.kinds = kinds
        self.c = cluster
        self.rng = rng
        self.base = base_nodes
        self.events: list[dict[str, Any]] = []
        self.failures: list[str] = []  # faults the cluster did not recover from in time
        self._round: list[str] = []

    def counts(self) -> dict[str, int]:
        return dict(Counter(e["kind"] for e in self.events))

    def run(self, until: float) -> None:
        """Inject faults until monotonic time ``until`` (a fault started before it finishes)."""
        for _ in range(100_000):  # bounded; the clock ends it long before
            gap = self.rng.uniform(*GAP_S)
            if time.monotonic() + gap >= until:
                return
            time.sleep(gap)
            if not self._round:
                self._round = list(self.kinds)
                self.rng.shuffle(self._round)
            self.one(self._round.pop())

    def one(self, kind: str) -> None:
        start = time.monotonic_ns()
        wall = time.strftime("%H:%M:%S")
        try:
            detail = getattr(self, f"_{kind}")()
        except (RuntimeError, TimeoutError, OSError) as exc:
            # The cluster (or the machine) did not take the fault as it should: a
            # violation to report, and the soak goes on with what is running.
            detail = f"failed: {type(exc).__name__}: {str(exc)[:500]}"
            self.failures.append(f"fault {kind}: {detail}")
            self._revive()
        event = {"kind": kind, "start": start, "wall": wall, "detail": detail}
        try:
            self.c.wait_whole(RECOVER_S)
            event["repair_s"] = round(self.c.wait_repaired(REPAIR_S), 1)
        except TimeoutError as exc:
            self.failures.append(f"recovery: after {kind} ({detail}): {exc}")
        event["end"] = time.monotonic_ns()
        self.events.append(event)
        print(
            f"soak: {wall} fault {kind}: {detail} ({(event['end'] - start) / 1e9:.1f}s, "
            f"re-replicated in {event.get('repair_s', '-')}s)",
            flush=True,
        )

    def _revive(self) -> None:
        """After a fault that failed half-way: heal every route, bring every base node back."""
        for name, child in self.c.nodes.items():
            self.c.proxy.heal(name)
            if child.paused and child.popen is not None:
                child.popen.send_signal(signal.SIGCONT)
                child.paused = False
        for attempt in range(3):
            try:
                if self.c.etcd is not None and not self.c.etcd.running:
                    self.c.etcd.restart()
                for router in self.c.routers.values():
                    if not router.alive():
                        self.c.start_child(router)
                for name in self.base:
                    if not self.c.nodes[name].alive():
                        self.c.start_child(self.c.nodes[name])
                return
            except RuntimeError as exc:
                self.failures.append(f"revive attempt {attempt + 1}: {str(exc)[:300]}")

    def _node(self) -> str:
        return self.rng.choice(self.base)

    def _incarnation(self, name: str) -> int | None:
        try:
            return self.c.incarnations().get(name)
        except grpc.RpcError:
            return None  # a router restarting: the restart then waits for the address only

    def _restart(self, name: str, old: int | None) -> None:
        """Start ``name`` again; back once the ring lists *this* process.

        The ring lists a node killed and restarted at once under its old
        lease until the new process registers: waiting for the address alone
        ended the wait (and the wait for re-replication after it) before the
        peers knew they had an empty node to refill.
        """
        child = self.c.nodes[name]
        self.c.start_child(child)
        self.c.wait_ring(lambda m: m.get(name) == child.address, RECOVER_S, f"{name} back")
        if old is None:
            return
        deadline = time.monotonic() + RECOVER_S
        while self._incarnation(name) in (old, None):
            if time.monotonic() > deadline:
                raise TimeoutError(f"after {RECOVER_S:.0f}s {name}'s new process not in the ring")
            time.sleep(0.1)

    # ------------------------------------------------------------------ process faults
    def _kill9(self) -> str:
        name = self._node()
        wait = self.rng.random() < 0.5
        old = self._incarnation(name)
        self.c.stop_child(self.c.nodes[name], signal.SIGKILL)
        if wait:
            self.c.wait_ring(lambda m: name not in m, RECOVER_S, f"{name}'s lease to expire")
        self._restart(name, old)
        return f"{name}, restarted {'after its lease expired' if wait else 'at once'}"

    def _pause(self) -> str:
        name = self._node()
        child = self.c.nodes[name]
        assert child.popen is not None
        child.popen.send_signal(signal.SIGSTOP)
        child.paused = True
        t = time.monotonic()
        try:
            self.c.wait_ring(lambda m: name not in m, RECOVER_S, f"{name} dropped while paused")
        finally:
            held = time.monotonic() - t
            child.popen.send_signal(signal.SIGCONT)
            child.paused = False
        return f"{name} stopped {held:.1f}s (until its lease expired)"

    def _drain(self) -> str:
        name = self._node()
        old = self._incarnation(name)
        code = self.c.stop_child(self.c.nodes[name], signal.SIGTERM)
        self._restart(name, old)
        return f"{name} drained (exit {code}), restarted"

    def _join_leave(self) -> str:
        extra = self.c.nodes.get(EXTRA_NODE)
        if extra is not None and extra.alive():
            code = self.c.stop_child(extra, signal.SIGTERM)
            return f"{EXTRA_NODE} left by drain (exit {code})"
        self.c.add_node(EXTRA_NODE, wait=False)
        return f"{EXTRA_NODE} joined"

    def _etcd_restart(self) -> str:
        assert self.c.etcd is not None
        for attempt in range(3):  # etcd's start is polled for 20 s; a loaded host may need more
            try:
                self.c.etcd.restart()
                return "etcd" + (f" (started on attempt {attempt + 1})" if attempt else "")
            except RuntimeError:
                if attempt == 2:
                    raise
        return "etcd"

    def _router_restart(self) -> str:
        name = self.rng.choice(sorted(self.c.routers))
        sig = signal.SIGKILL if self.rng.random() < 1 / 3 else signal.SIGTERM
        code = self.c.stop_child(self.c.routers[name], sig)
        self.c.start_child(self.c.routers[name])
        return f"{name} {sig.name} (exit {code}), restarted"

    # ------------------------------------------------------------------ network faults
    def _hold(self, name: str, faults: Faults, seconds: float) -> None:
        self.c.proxy.set_faults(name, faults)
        try:
            time.sleep(seconds)  # the fault's duration
        finally:
            self.c.proxy.heal(name)

    def _latency(self) -> str:
        name, ms, s = self._node(), self.rng.choice((50, 150, 400)), self.rng.uniform(4, 8)
        self._hold(name, Faults(latency_s=ms / 1000), s)
        return f"{name} +{ms} ms for {s:.1f}s"

    def _bandwidth(self) -> str:
        name, kib, s = self._node(), self.rng.choice((128, 512, 2048)), self.rng.uniform(4, 8)
        self._hold(name, Faults(bandwidth_bps=kib * 1024), s)
        return f"{name} capped at {kib} KiB/s for {s:.1f}s"

    def _reset(self) -> str:
        name, n = self._node(), 0
        for i in range(3):
            if i:
                time.sleep(1.0)  # the fault's pace: three resets a second apart
            n += self.c.proxy.reset(name)
        return f"{name}: {n} connections reset"

    def _blackhole(self) -> str:
        name = self._node()
        s = self.rng.choice((self.rng.uniform(1, 2), self.rng.uniform(4, 6)))
        self._hold(name, Faults(blackhole=True), s)
        return f"{name} black-holed {s:.1f}s"
