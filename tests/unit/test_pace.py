"""Pacing of background work (node/pace.py) and the rebalance scan that uses it."""

from __future__ import annotations

import pytest

from tensorcache import codec
from tensorcache.node.ops import EpochView, NodeOps
from tensorcache.node.pace import Activity, PaceConfig, Pacer
from tensorcache.node.rebalance import Rebalancer
from tensorcache.node.rings import RingView
from tensorcache.node.store import Store
from tensorcache.proto import tensorcache_pb2 as pb
from tensorcache.ring import Ring, RingMember
from tests.unit.test_node_ops import Clock, Cluster, get, put

pytestmark = pytest.mark.unit


class Sleeps:
    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


def test_a_busy_data_path_gets_the_share_the_config_leaves_it():
    sleeps = Sleeps()
    busy = [True]
    pacer = Pacer(lambda: busy[0], PaceConfig(share=0.25, max_pause_s=0.05), sleep=sleeps)
    assert pacer.after(0.002) == pytest.approx(0.006)  # runs 1/4 of the time: 3x paused
    assert pacer.after(1.0) == 0.05  # one slow chunk never stalls the scan for long
    busy[0] = False
    assert pacer.after(0.002) == 0.0  # idle: full speed, but still yields the interpreter
    assert sleeps.calls == [pytest.approx(0.006), 0.05, 0.0]
    assert pacer.paused_s == pytest.approx(0.056)


def test_share_one_never_pauses():
    sleeps = Sleeps()
    pacer = Pacer(lambda: True, PaceConfig(share=1.0), sleep=sleeps)
    assert pacer.after(0.5) == 0.0 and sleeps.calls == [0.0]


@pytest.mark.parametrize(
    "field, value",
    [("share", 0.0), ("share", 1.5), ("max_pause_s", -1.0), ("idle_s", 11.0)],
)
def test_bad_pace_config_is_a_value_error_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        PaceConfig(**{field: value})


def test_activity_is_busy_while_a_request_runs_and_idle_s_after():
    clock = Clock()
    activity = Activity(idle_s=0.05, clock=clock)
    assert not activity.busy()
    activity.begin()
    clock.now += 60.0  # a long request is busy however long it takes
    assert activity.busy()
    activity.end()
    clock.now += 0.04
    assert activity.busy()
    clock.now += 0.02
    assert not activity.busy()
    activity.touch()
    assert activity.busy()


def _node(name: str, idle_s: float) -> NodeOps:
    rings = RingView(name)
    ops = NodeOps(
        Store(1 << 20, stale=rings.stale, judge=rings),
        name,
        name,
        EpochView(),
        rings=rings,
        rereplicate=False,
        pace=PaceConfig(idle_s=idle_s),
    )
    ring = Ring(1, [RingMember(name, name, 1)], weight_unit=1)
    ops.install_ring(ring)
    ops.epochs.update(ring.epoch)
    return ops


def test_gets_handoffs_and_client_puts_are_activity_and_pushes_are_not():
    """A handoff is on the path of a get at another node: it counts. A push
    (a copy from another node's scan, epoch 0) is background work: it does not."""
    for request in ("get", "handoff", "put"):
        ops = _node("a", idle_s=10.0)  # busy 10 s after a request: no race
        assert not ops.activity.busy()
        if request == "put":
            put(ops, "k", b"v")
        else:
            got, _ = get(ops, "k", handoff=request == "handoff")
            assert not got.found
        assert ops.activity.busy(), request
    ops = _node("a", idle_s=10.0)
    meta = pb.TensorMeta(dtype="|u1", shape=[1], order="C", nbytes=1, crc32c=codec.crc32c(b"v"))
    push = pb.PutRequest(epoch=0, entries=[pb.EntryPut(key=b"k", meta=meta, version=7)])
    plan = ops.plan_put(push)
    try:
        assert ops.finish_put(plan, [(b"v",)], [codec.crc32c(b"v")]).results[0].version == 7
    finally:
        ops.abort_put(plan)
    assert not ops.activity.busy()


def test_a_paced_scan_pauses_after_every_chunk_and_still_moves_every_key():
    """While the data path is busy the scan pauses in proportion to its work,
    chunk by chunk, and a scan with the data path always busy still ends
    with every moved key at its new owner (the slowdown is bounded)."""
    cl = Cluster("a", "b")
    r1 = cl.ring("a")
    cl.install(r1)
    keys = [f"k{i}" for i in range(40)]
    for k in keys:
        put(cl["a"], k, k.encode())
    r2 = cl.ring("a", "b")
    cl.install(r2)
    away = [k for k in keys if r2.owner(k).name == "b"]
    assert away
    sleeps = Sleeps()
    a = cl["a"]
    rebalancer = Rebalancer(
        "a",
        a.store,
        a.rings,
        cl.peers,
        chunk=8,
        enabled=False,
        resolve=a.handoff.fetch,
        pacer=Pacer(lambda: True, PaceConfig(share=0.5), sleep=sleeps),
    )
    assert rebalancer.scan_now() == len(away)
    assert len(sleeps.calls) == 40 // 8  # one pause per chunk
    assert all(0.0 <= s <= 0.05 for s in sleeps.calls)
    for k in away:
        got, data = get(cl["b"], k)
        assert got.found and data == k.encode()
