"""Router.Publish -> Router.Watch, Router.Invalidate and Router.Status through a real router.

The router runs as a process (``LocalCluster``, no nodes needed: the tests
publish as a node would, over the raw stub). Watch streams are read on a
thread into a queue so every read has a deadline; nothing sleeps a fixed
time and nothing asserts how long anything took.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from tensorcache.apps.cluster import LocalCluster
from tensorcache.grpcutil import CHANNEL_OPTIONS
from tensorcache.proto import tensorcache_pb2 as pb
from tensorcache.proto import tensorcache_pb2_grpc as pb_grpc

from .helpers import rpc_error

pytestmark = pytest.mark.integration

READ_TIMEOUT = 20.0


class WatchStream:
    """One Router.Watch stream, read on a thread; ``next()`` waits with a deadline."""

    def __init__(self, router: str) -> None:
        self._channel = grpc.insecure_channel(router, options=CHANNEL_OPTIONS)
        self._call = pb_grpc.RouterStub(self._channel).Watch(
            pb.WatchRequest(), wait_for_ready=True, timeout=120
        )
        self._messages: queue.Queue[pb.WatchEvent | BaseException | None] = queue.Queue()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for message in self._call:
                self._messages.put(message)
            self._messages.put(None)  # ended with OK
        except grpc.RpcError as exc:
            self._messages.put(exc)

    def next(self, timeout: float = READ_TIMEOUT) -> pb.WatchEvent | None:
        """The next message; None when the stream ended cleanly; raises its error."""
        try:
            item = self._messages.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"no watch message within {timeout:.0f}s")
        if isinstance(item, BaseException):
            raise item
        return item

    def until(self, done: Callable[[list[pb.WatchEvent]], bool]) -> list[pb.WatchEvent]:
        """Messages read until ``done(all messages so far)``; at most 1000 of them."""
        seen: list[pb.WatchEvent] = []
        for _ in range(1000):
            message = self.next()
            assert message is not None, "the stream ended early"
            seen.append(message)
            if done(seen):
                return seen
        pytest.fail("no wanted message among 1000")

    def close(self) -> None:
        self._call.cancel()
        self._thread.join(10)
        self._channel.close()


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    c = LocalCluster(0, replicas=2, log_dir=tmp_path_factory.mktemp("events")).start()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def stub(router: LocalCluster) -> Iterator[Any]:
    with grpc.insecure_channel(router.router_address, options=CHANNEL_OPTIONS) as ch:
        yield pb_grpc.RouterStub(ch)


@pytest.fixture
def watch(router: LocalCluster) -> Iterator[Callable[[], WatchStream]]:
    streams: list[WatchStream] = []

    def open_stream() -> WatchStream:
        streams.append(WatchStream(router.router_address))
        return streams[-1]

    try:
        yield open_stream
    finally:
        for s in streams:
            s.close()


def keys_of(messages: list[pb.WatchEvent]) -> list[tuple[bytes, int]]:
    return [(k.key, k.version) for m in messages for k in m.keys]


def invalidations_of(messages: list[pb.WatchEvent]) -> set[tuple[str, int]]:
    return {(i.prefix, i.epoch) for m in messages for i in m.invalidations}


def test_a_stream_starts_with_a_reset_holding_the_epoch_and_invalidations(
    stub: Any, watch: Callable[[], WatchStream]
) -> None:
    generation = stub.Invalidate(pb.InvalidateRequest(prefix="start/"), timeout=10).generation
    first = watch().next()
    assert first is not None and first.reset
    assert first.epoch >= generation
    assert ("start/", generation) in {(i.prefix, i.epoch) for i in first.invalidations}
    assert not first.keys


def test_published_events_reach_every_watcher_in_order(
    stub: Any, watch: Callable[[], WatchStream]
) -> None:
    a, b = watch(), watch()
    for s in (a, b):
        assert s.next().reset  # type: ignore[union-attr]
    sent = [(f"pub/{i}".encode(), i + 1) for i in range(50)] + [(b"pub/3", 0)]
    for i in range(0, len(sent), 7):
        stub.Publish(
            pb.PublishRequest(
                node="node-x", events=[pb.KeyEvent(key=k, version=v) for k, v in sent[i : i + 7]]
            ),
            timeout=10,
        )
    for s in (a, b):
        got = s.until(lambda seen: len(keys_of(seen)) >= len(sent))
        assert keys_of(got) == sent


def test_invalidations_flow_to_watchers_and_replace_older_records(
    stub: Any, watch: Callable[[], WatchStream]
) -> None:
    s = watch()
    assert s.next().reset  # type: ignore[union-attr]
    first = stub.Invalidate(pb.InvalidateRequest(prefix="inv/"), timeout=10).generation
    second = stub.Invalidate(pb.InvalidateRequest(prefix="inv/"), timeout=10).generation
    assert second > first
    heard = s.until(lambda seen: ("inv/", second) in invalidations_of(seen))
    for m in heard:  # a message's epoch already holds the records it carries
        assert all(i.epoch <= m.epoch for i in m.invalidations)
    ring = stub.GetRing(pb.GetRingRequest(), timeout=10)
    table = {i.prefix: i.epoch for i in ring.invalidations}
    assert table["inv/"] == second  # the newer record replaced the older
    assert ring.epoch >= second


def test_a_quiet_stream_keeps_sending_epochs(watch: Callable[[], WatchStream]) -> None:
    s = watch()
    assert s.next().reset  # type: ignore[union-attr]
    for _ in range(3):  # keepalives: epoch only, no events, no reset
        m = s.next()
        assert m is not None and m.epoch > 0 and not m.reset


def test_everything_prefix_is_allowed_and_bad_prefixes_are_refused(stub: Any) -> None:
    assert stub.Invalidate(pb.InvalidateRequest(prefix=""), timeout=10).generation > 0
    for bad in ("x" * 1025, "a\0b"):
        err = rpc_error(lambda b=bad: stub.Invalidate(pb.InvalidateRequest(prefix=b), timeout=10))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_publish_refuses_empty_keys(stub: Any) -> None:
    err = rpc_error(
        lambda: stub.Publish(
            pb.PublishRequest(node="n", events=[pb.KeyEvent(key=b"", version=1)]), timeout=10
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "events[0].key" in err.details()


def test_status_and_ring_carry_replicas(stub: Any) -> None:
    status = stub.Status(pb.RouterStatusRequest(), timeout=10)
    assert (status.state, status.membership, status.replicas) == ("ok", "embedded", 2)
    assert status.detail == "" and status.members == 0 and status.epoch > 0
    assert stub.GetRing(pb.GetRingRequest(), timeout=10).replicas == 2


def test_streams_end_cleanly_when_the_router_stops(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    c = LocalCluster(0, log_dir=tmp_path_factory.mktemp("stop")).start()
    try:
        s = WatchStream(c.router_address)
        assert s.next().reset  # type: ignore[union-attr]
        assert c.stop_router() == 0
        for _ in range(100):  # keepalives may still be in flight; then the clean end
            if s.next() is None:
                break
        else:
            pytest.fail("the stream did not end")
        s.close()
    finally:
        c.stop()
