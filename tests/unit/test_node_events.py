"""The node's key-event publisher against an in-process router stub on port 0."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from tensorcache.node.events import EventPublisher
from tensorcache.proto import tensorcache_pb2 as pb
from tensorcache.proto import tensorcache_pb2_grpc as pb_grpc

pytestmark = pytest.mark.unit


class Router(pb_grpc.RouterServicer):
    def __init__(self) -> None:
        self.batches: list[tuple[str, list[tuple[bytes, int]]]] = []
        self.got = threading.Condition()

    def Publish(self, request: pb.PublishRequest, context: grpc.ServicerContext) -> pb.PublishReply:
        with self.got:
            self.batches.append((request.node, [(e.key, e.version) for e in request.events]))
            self.got.notify_all()
        return pb.PublishReply()

    def events(self) -> list[tuple[bytes, int]]:
        with self.got:
            return [e for _, batch in self.batches for e in batch]

    def wait_for(self, n: int, timeout: float = 10.0) -> list[tuple[bytes, int]]:
        deadline = time.monotonic() + timeout
        with self.got:
            while len([e for _, b in self.batches for e in b]) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.got.wait(left)
        return self.events()


def serve(servicer: pb_grpc.RouterServicer) -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_RouterServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(0)


@pytest.fixture
def router() -> Iterator[tuple[Router, str]]:
    servicer = Router()
    for address in serve(servicer):
        yield servicer, address


def test_events_reach_the_router_in_order(router):
    servicer, address = router
    pub = EventPublisher(address, "node-7")
    try:
        for i in range(100):
            pub.publish(f"k{i}", i + 1)
        pub.publish("k0", 0)
        events = servicer.wait_for(101)
    finally:
        pub.close()
    assert events == [(f"k{i}".encode(), i + 1) for i in range(100)] + [(b"k0", 0)]
    assert {node for node, _ in servicer.batches} == {"node-7"}
    assert pub.published == 101 and pub.dropped == 0


def test_a_full_queue_drops_the_oldest_events(router):
    servicer, address = router
    pub = EventPublisher(address, "n", interval_s=3600, max_queued=10)  # no flush until close
    for i in range(15):
        pub.publish(f"k{i}", i + 1)
    assert pub.dropped == 5
    pub.close()  # flushes what is queued
    assert servicer.events() == [(f"k{i}".encode(), i + 1) for i in range(5, 15)]


def test_a_router_without_publish_is_a_quiet_no_op():
    for address in serve(pb_grpc.RouterServicer()):  # every method UNIMPLEMENTED
        pub = EventPublisher(address, "n")
        pub.publish("k", 1)
        pub.close()
        assert pub.dropped == 0 and pub.published == 0


def test_an_unreachable_router_is_never_fatal():
    pub = EventPublisher("127.0.0.1:1", "n")
    pub.publish("k", 1)
    pub.close()
    assert pub.published == 0
    assert pub.dropped == 1


def test_a_burst_waits_out_the_gap_and_goes_in_one_publish(router):
    servicer, address = router
    pub = EventPublisher(address, "n", min_gap_s=1.0)
    try:
        pub.publish("first", 1)  # after a quiet spell: sent at once
        assert servicer.wait_for(1) == [(b"first", 1)]
        for i in range(50):  # within the gap: gathered into one Publish
            pub.publish(f"k{i}", i + 1)
        events = servicer.wait_for(51)
    finally:
        pub.close()
    assert events == [(b"first", 1)] + [(f"k{i}".encode(), i + 1) for i in range(50)]
    assert [len(b) for _, b in servicer.batches if b] == [1, 50]


def test_the_gap_must_not_be_negative():
    with pytest.raises(ValueError, match="min_gap_s"):
        EventPublisher("127.0.0.1:1", "n", min_gap_s=-1)
