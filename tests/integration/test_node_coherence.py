"""Node-side coherence on real processes: fencing, invalidation, key events.

* A node's first write of a new epoch fences the other members: once the
  write returns, none of them serves a request placed with an older ring.
* A namespace invalidation hides every older value under its prefix on the
  nodes, which drop them when they meet them.
* Nodes publish what they commit and delete to the router, which pushes it
  to watchers (watch-mode near-caches).
(docs/consistency.md: "Epoch fencing", "Namespace invalidation", "Near-cache".)
"""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest

import tensorcache
from tensorcache.grpcutil import CHANNEL_OPTIONS
from tensorcache.proto import tensorcache_pb2 as pb
from tensorcache.proto import tensorcache_pb2_grpc as pb_grpc
from tensorcache.wire import ring_from_snapshot

from .helpers import get_request, node_stat, raw_get, raw_put, rpc_error, tensor_header, total

pytestmark = pytest.mark.integration


def test_a_write_at_a_new_owner_fences_the_old_one(make_cluster, prefix):
    # Heartbeats so rare that only the fence can tell node-0 about the join.
    cl = make_cluster(2, heartbeat_interval=20.0, ttl=60.0)
    before = ring_from_snapshot(cl.ring())
    new = cl.add_node()
    after = ring_from_snapshot(cl.ring())
    key = next(
        f"{prefix}{i}"
        for i in range(10_000)
        if before.owner(f"{prefix}{i}").name == "node-0"
        and after.owner(f"{prefix}{i}").name == new.name
    )
    payload = b"written at the new owner"
    reply = raw_put(new.address, [tensor_header(key.encode(), payload, epoch=after.epoch), payload])
    assert reply.results[0].version > 0
    old = cl.nodes["node-0"]
    assert node_stat(old.address).epoch >= after.epoch  # fenced before the write committed
    err = rpc_error(lambda: raw_get(old.address, get_request(key.encode(), epoch=before.epoch)))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_invalidation_hides_older_values_on_the_nodes(make_cluster, prefix):
    cl = make_cluster(3)
    with tensorcache.connect(cl.router_address) as c:
        old = {f"{prefix}m/{i}": np.full(16, i) for i in range(50)}
        keep = {f"{prefix}keep/{i}": np.full(16, i) for i in range(50)}
        c.put_many({**old, **keep})
        c.invalidate(prefix + "m/")
        assert all(v is None for v in c.get_many(list(old)).values())
        got = c.get_many(list(keep))
        assert all(np.array_equal(got[k], v) for k, v in keep.items())
        assert total(c.stats(), "invalidated") == len(old)  # dropped when met
        key = next(iter(old))
        c.put(key, np.arange(3), if_version=0)  # absent since the invalidation
        np.testing.assert_array_equal(c.get(key), np.arange(3))


def test_commits_and_deletes_reach_watchers(make_cluster, prefix):
    cl = make_cluster(2)
    key = prefix + "k"
    seen: list[tuple[bytes, int]] = []
    started = threading.Event()
    done = threading.Event()

    def watch() -> None:
        with grpc.insecure_channel(cl.router_address, options=CHANNEL_OPTIONS) as ch:
            stream = pb_grpc.RouterStub(ch).Watch(pb.WatchRequest(), timeout=30)
            try:
                for msg in stream:
                    # Only once the router hears every node: the message that
                    # turns the stream complete is a reset, which would drop
                    # events already queued (the router's contract: watchers
                    # revalidate until then).
                    if msg.complete:
                        started.set()
                    seen.extend((e.key, e.version) for e in msg.keys)
                    if (key.encode(), 0) in seen:
                        done.set()
                        return
            except grpc.RpcError:
                started.set()  # the test reports what it saw

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    assert started.wait(30), "the router's event stream never became complete"
    with tensorcache.connect(cl.router_address) as c:
        version = c.put(key, np.arange(4))
        assert c.delete(key)
    done.wait(30)
    t.join(5)
    mine = [(k, v) for k, v in seen if k == key.encode()]
    assert mine == [(key.encode(), version), (key.encode(), 0)], seen[-10:]
