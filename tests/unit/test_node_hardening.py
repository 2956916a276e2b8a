"""Versions and stamps from peers are bounded like clients' (node/ops.py, node/handoff.py).

In-process nodes (tests/unit/test_node_ops.py's Cluster: real NodeOps, peers
called directly). A version beyond MAX_VERSION would stop a node's version
clock (every later write fails); a stamp beyond the cluster's epoch would make
an entry immune to every invalidation.
"""

from __future__ import annotations

import pytest

from tensorcache.errors import InvalidArgument
from tensorcache.node.entry import MAX_VERSION
from tensorcache.proto import tensorcache_pb2 as pb

from .test_node_ops import Cluster, LocalPeers, get, moved_keys, put

pytestmark = pytest.mark.unit


class LyingPeers(LocalPeers):
    """Peers whose answers claim a version no node assigns."""

    def get(self, address: str, request: pb.GetRequest, timeout: float):
        reply, messages = super().get(address, request, timeout)
        for e in reply.entries:
            e.version = 2**64 - 1
        return reply, messages


def test_handoff_answers_beyond_the_version_limit_are_ignored() -> None:
    cl = Cluster()
    cl.peers = LyingPeers()
    for name in ("a", "b", "c"):
        cl.node(name)
    r1 = cl.ring("a", "b")
    cl.install(r1)
    r2 = cl.ring("a", "b", "c")
    key, other = moved_keys(r1, r2, "a", "c", n=2)
    put(cl["a"], key, b"old")
    put(cl["a"], other, b"old")
    cl.install(r2)
    # The previous owner's answer (version 2**64-1) is not taken: a miss here...
    got, _ = get(cl["c"], key)
    assert not got.found
    # ...and the clock is not moved by it: writes keep working, below the limit.
    first = put(cl["c"], other, b"new", if_version=0)  # the lie is not a known version
    second = put(cl["c"], other, b"newer")
    assert 0 < first.version < second.version <= MAX_VERSION
    assert get(cl["c"], other)[1] == b"newer"


def test_a_pushed_stamp_beyond_the_clusters_epoch_is_refused() -> None:
    cl = Cluster("a", "b")
    cl.install(cl.ring("a", "b"))
    epoch = cl["a"].epochs.epoch
    with pytest.raises(InvalidArgument, match=r"entries\[0\]\.stamp"):
        put(cl["a"], "k", b"x", version=5, stamp=2**64 - 1)
    assert cl.synced == [("a", 2**64 - 1)]  # it asked its router first (a newer ring?)
    assert not get(cl["a"], "k")[0].found
    # A stamp the node knows is taken, and invalidation still reaches it.
    put(cl["a"], "k", b"x", version=5, stamp=epoch)
    assert get(cl["a"], "k")[0].found
    cl.install(cl.ring("a", "b", invalidations={"k": cl.epoch + 1}))
    assert not get(cl["a"], "k")[0].found
