"""Control-plane faults: etcd down and back, the router killed and restarted.

The contract (docs/operations.md): while etcd is down the data path keeps
serving on the last ring, and whatever needs etcd (a node joining, an
invalidation) fails fast with UNAVAILABLE naming etcd; the router says it
is degraded. When etcd (or the router) comes back, everything recovers by
itself and the ring does not flap. Real processes only: a private etcd
restarted on the same URL and data directory, router and nodes from
``LocalCluster``. Waits poll with deadlines; nothing asserts durations.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import tensorcache
from tensorcache.apps.cluster import LocalCluster
from tensorcache.grpcutil import CHANNEL_OPTIONS
from tensorcache.proto import tensorcache_pb2 as pb
from tensorcache.proto import tensorcache_pb2_grpc as pb_grpc

from .helpers import poll, rpc_error

pytestmark = pytest.mark.integration

TTL = 3.0
HEARTBEAT = 0.5
ETCD_TIMEOUT = 2.0  # the router's etcd call timeout: how fast "fail fast" is
CALL_TIMEOUT = 30.0  # far above it: a hang shows as DEADLINE_EXCEEDED, not UNAVAILABLE
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., LocalCluster]]:
    started: list[LocalCluster] = []

    def make(nodes: int = 3, *, etcd: str = "auto") -> LocalCluster:
        c = LocalCluster(
            nodes,
            capacity="64MiB",
            ttl=TTL,
            heartbeat_interval=HEARTBEAT,
            etcd=etcd,
            router_args=["--etcd-timeout", str(ETCD_TIMEOUT)],
            log_dir=tmp_path / f"cluster-{len(started)}",
        )
        started.append(c)
        return c.start()

    try:
        yield make
    finally:
        for c in started:
            c.stop()


class Router:
    """Raw stubs on one router address (Router service and grpc health)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        self.stub: Any = pb_grpc.RouterStub(self._channel)
        self._health: Any = health_pb2_grpc.HealthStub(self._channel)

    def status(self) -> pb.RouterStatus:
        return self.stub.Status(pb.RouterStatusRequest(), timeout=10, wait_for_ready=True)

    def health(self, service: str) -> int:
        request = health_pb2.HealthCheckRequest(service=service)
        return self._health.Check(request, timeout=10, wait_for_ready=True).status

    def names(self) -> set[str]:
        ring = self.stub.GetRing(pb.GetRingRequest(), timeout=10, wait_for_ready=True)
        return {m.name for m in ring.members}

    def close(self) -> None:
        self._channel.close()


def values(tag: str) -> dict[str, np.ndarray]:
    return {f"{tag}/{i}": np.arange(i * 100, dtype=np.float32) + i for i in range(1, 9)}


def assert_all(client: Any, want: dict[str, np.ndarray]) -> None:
    for key, value in want.items():
        got = client.get(key)
        assert got is not None, f"{key} missing"
        np.testing.assert_array_equal(got, value)


def stays(router: Router, want: set[str], seconds: float) -> None:
    """Fail unless the ring lists exactly ``want`` at every poll for ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert router.names() == want
        time.sleep(0.1)


def late_member() -> pb.Member:
    return pb.Member(name="late", address="127.0.0.1:9", capacity=64 << 20)


@pytest.mark.parametrize("how", ["stopped", "hung"])
def test_etcd_outage_keeps_the_data_path_and_recovers_by_itself(
    etcd_binary: str, start: Callable[..., LocalCluster], how: str
) -> None:
    """``stopped``: etcd exits and starts again (connections refused meanwhile).
    ``hung``: etcd is frozen (SIGSTOP), so every call must time out, not hang."""
    c = start(3)
    router = Router(c.router_address)
    names = set(c.nodes)
    before = values("before")
    with tensorcache.connect(c.router_address) as client:
        for key, value in before.items():
            client.put(key, value)
        epoch = poll(lambda: router.status().state == "ok" and router.status(), what="ok").epoch

        if how == "stopped":
            c.stop_etcd()
        else:
            c.pause_etcd()
        # Hold the outage past every node's lease (etcd counts nothing while down).
        outage_ends = time.monotonic() + 2 * TTL
        st = poll(
            lambda: (s := router.status()).state == "degraded" and s,
            timeout=30,
            what="the router to say degraded",
        )
        assert "etcd" in st.detail and c.etcd_url in st.detail
        assert st.membership == c.etcd_url
        poll(
            lambda: router.health("tensorcache.v1.Router") == NOT_SERVING,
            what="grpc health of the Router service to follow",
        )
        assert router.health("") == SERVING  # it still serves the last ring

        # The data path keeps going on the last ring.
        assert router.names() == names
        assert_all(client, before)
        during = values("during")
        for key, value in during.items():
            client.put(key, value)
        assert_all(client, during)

        # What needs etcd fails fast, and says why.
        for call in (
            lambda: router.stub.Register(
                pb.RegisterRequest(member=late_member()), timeout=CALL_TIMEOUT
            ),
            lambda: router.stub.Invalidate(
                pb.InvalidateRequest(prefix="during/"), timeout=CALL_TIMEOUT
            ),
        ):
            err = rpc_error(call)
            assert err.code() == grpc.StatusCode.UNAVAILABLE, err
            assert "etcd" in (err.details() or "")
        with pytest.raises(tensorcache.Unavailable, match="etcd"):  # the client says so too
            client.invalidate("during/", timeout_s=CALL_TIMEOUT)

        stat = subprocess.run(
            [sys.executable, "-m", "tensorcache", "stat", "--router", c.router_address],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert stat.returncode == 0, stat.stderr
        assert "state degraded" in stat.stdout

        while time.monotonic() < outage_ends:  # still serving, still degraded
            assert router.status().state == "degraded"
            assert_all(client, during)
            time.sleep(0.2)
        if how == "stopped":
            c.start_etcd()
        else:
            c.resume_etcd()
        st = poll(
            lambda: (s := router.status()).state == "ok" and s,
            timeout=30,
            what="the router to recover",
        )
        assert st.detail == ""
        poll(
            lambda: router.health("tensorcache.v1.Router") == SERVING,
            what="grpc health of the Router service to follow",
        )
        # Nobody was forgotten, and the ring does not flap afterwards.
        assert router.names() == names
        stays(router, names, 2 * TTL)
        if how == "stopped":  # a restarted etcd renewed every lease: nothing changed
            assert router.status().epoch == epoch

        gen = router.stub.Invalidate(pb.InvalidateRequest(prefix="during/"), timeout=10)
        assert gen.generation > epoch
        ring = router.stub.GetRing(pb.GetRingRequest(), timeout=10)
        assert ("during/", gen.generation) in {(i.prefix, i.epoch) for i in ring.invalidations}
        assert_all(client, before)
        c.add_node("late")  # a join works again
        assert router.names() == {*names, "late"}
    router.close()


@pytest.mark.parametrize("membership", ["auto", "none"], ids=["etcd", "embedded"])
def test_router_restart_clients_keep_working(
    etcd_binary: str, start: Callable[..., LocalCluster], membership: str
) -> None:
    c = start(3, etcd=membership)
    names = set(c.nodes)
    before = values("before")
    with tensorcache.connect(c.router_address) as client:
        for key, value in before.items():
            client.put(key, value)
        epoch = c.ring().epoch

        c.restart_router(kill=True)
        snap = c.wait_members(names, 30)
        assert snap.epoch >= epoch
        router = Router(c.router_address)
        assert router.status().state == "ok"
        router.close()

        # The same client, never reconnected by hand.
        after = values("after")
        for key, value in after.items():
            client.put(key, value)
        assert_all(client, after)
        if membership == "auto":  # the nodes kept their keys and the ring kept its shape
            assert_all(client, before)


def test_invalidate_with_etcd_returns_an_epoch_the_ring_already_has(
    etcd_binary: str, start: Callable[..., LocalCluster]
) -> None:
    c = start(1)
    router = Router(c.router_address)
    first = router.stub.Invalidate(pb.InvalidateRequest(prefix="m/"), timeout=10).generation
    ring = router.stub.GetRing(pb.GetRingRequest(), timeout=10)
    assert ring.epoch >= first
    assert {i.prefix: i.epoch for i in ring.invalidations} == {"m/": first}
    again = router.stub.Invalidate(pb.InvalidateRequest(prefix="m/"), timeout=10).generation
    everything = router.stub.Invalidate(pb.InvalidateRequest(prefix=""), timeout=10).generation
    assert first < again < everything
    ring = router.stub.GetRing(pb.GetRingRequest(), timeout=10)
    assert {i.prefix: i.epoch for i in ring.invalidations} == {"m/": again, "": everything}

    # A restarted router reads the table back from etcd, epochs intact.
    c.restart_router()
    c.wait_members(set(c.nodes), 30)
    ring = router.stub.GetRing(pb.GetRingRequest(), timeout=10, wait_for_ready=True)
    assert {i.prefix: i.epoch for i in ring.invalidations} == {"m/": again, "": everything}
    router.close()


def test_router_refuses_zero_replicas() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "tensorcache", "router", "--port", "0", "--replicas", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2
    assert "replicas must be >= 1, got 0" in res.stderr
    assert "Traceback" not in res.stderr
