"""Node rules across ring changes, on in-process nodes wired by an in-process Peers.

Demotion, warm handoff, settled keys, versions across a move, namespace
invalidation, fencing, key events and drain: docs/consistency.md, with no
sockets (``LocalPeers`` calls the other node's NodeOps directly).
"""

from __future__ import annotations

from collections.abc import Iterable

import pytest

from tensorcache import codec
from tensorcache.errors import InvalidArgument, StaleEpoch, Unavailable, VersionConflict
from tensorcache.node.ops import EpochView, NodeOps
from tensorcache.node.payload import split_payload
from tensorcache.node.rings import RingView
from tensorcache.node.store import Store
from tensorcache.proto import tensorcache_pb2 as pb
from tensorcache.ring import Ring, RingMember

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class LocalPeers:
    """``Peers`` that call the target node's NodeOps in-process."""

    def __init__(self) -> None:
        self.nodes: dict[str, NodeOps] = {}
        self.down: set[str] = set()
        self.fences: list[tuple[str, int]] = []
        self.gets: list[tuple[str, pb.GetRequest]] = []

    def _node(self, address: str) -> NodeOps:
        if address in self.down:
            raise Unavailable(f"node {address} is down")
        return self.nodes[address]

    def get(self, address: str, request: pb.GetRequest, timeout: float):
        self.gets.append((address, request))
        reply, payload, _ = self._node(address).get(request)
        messages = [] if request.head_only else [bytes(c) for e in payload for c in e.chunks]
        return reply, messages

    def put(self, address: str, request: pb.PutRequest, payload: Iterable[bytes], timeout: float):
        ops = self._node(address)
        plan = ops.plan_put(request)
        try:
            chunks, crcs = split_payload(payload, plan.sizes)
            return ops.finish_put(plan, chunks, crcs)
        finally:
            ops.abort_put(plan)

    def fence(self, address: str, epoch: int, timeout: float) -> int:
        self.fences.append((address, epoch))
        return self._node(address).fence(pb.FenceRequest(epoch=epoch)).epoch


class Events:
    def __init__(self) -> None:
        self.seen: list[tuple[str, int]] = []

    def publish(self, key: str, version: int) -> None:
        self.seen.append((key, version))

    def close(self) -> None:
        pass


class Cluster:
    def __init__(self, *names: str) -> None:
        self.peers = LocalPeers()
        self.clock = Clock()
        self.events: dict[str, Events] = {}
        self.synced: list[tuple[str, int]] = []
        #: The router's ring: a node that syncs (a fence, a newer client
        #: epoch) installs it, as the agent would (None: nothing to fetch).
        self.router: Ring | None = None
        self.epoch = 100
        for name in names:
            self.node(name)

    def node(self, name: str) -> NodeOps:
        rings = RingView(name, clock=self.clock)
        self.events[name] = Events()
        ops = NodeOps(
            Store(1 << 24, stale=rings.stale, judge=rings),
            name,
            name,
            EpochView(),
            rings=rings,
            peers=self.peers,
            events=self.events[name],
            sync=lambda epoch, n=name: self._sync(n, epoch),
            rereplicate=False,  # background pushes: tested on their own below
        )
        self.peers.nodes[name] = ops
        return ops

    def _sync(self, name: str, epoch: int) -> None:
        self.synced.append((name, epoch))
        if self.router is not None and self.router.epoch > self[name].epochs.epoch:
            self.install(self.router, name)

    def ring(self, *names: str, invalidations: dict[str, int] | None = None) -> Ring:
        self.epoch += 1
        members = [RingMember(n, n, 1) for n in names]
        return Ring(self.epoch, members, weight_unit=1, invalidations=invalidations)

    def install(self, ring: Ring, *names: str) -> None:
        """What the agent does: install the ring, then publish its epoch."""
        for name in names or list(self.peers.nodes):
            ops = self.peers.nodes[name]
            ops.install_ring(ring)
            ops.epochs.update(ring.epoch)

    def __getitem__(self, name: str) -> NodeOps:
        return self.peers.nodes[name]


def put(ops: NodeOps, key: str, payload: bytes, **entry: int) -> pb.PutResult:
    meta = pb.TensorMeta(
        dtype="|u1",
        shape=[len(payload)],
        order="C",
        nbytes=len(payload),
        crc32c=codec.crc32c(payload),
    )
    req = pb.PutRequest(
        epoch=ops.epochs.epoch, entries=[pb.EntryPut(key=key.encode(), meta=meta, **entry)]
    )
    plan = ops.plan_put(req)
    try:
        return ops.finish_put(plan, [(payload,)], [codec.crc32c(payload)]).results[0]
    finally:
        ops.abort_put(plan)


def get(ops: NodeOps, key: str, *, handoff: bool = False) -> tuple[pb.EntryGot, bytes]:
    req = pb.GetRequest(
        epoch=ops.epochs.epoch, keys=[pb.EntryKey(key=key.encode())], handoff=handoff
    )
    reply, payload, _ = ops.get(req)
    return reply.entries[0], b"".join(bytes(c) for e in payload for c in e.chunks)


def delete(ops: NodeOps, key: str) -> bool:
    req = pb.DeleteRequest(epoch=ops.epochs.epoch, keys=[pb.EntryKey(key=key.encode())])
    return ops.delete(req).results[0].found


def moved_keys(before: Ring, after: Ring, frm: str, to: str, n: int = 5) -> list[str]:
    out = [
        f"k{i}"
        for i in range(2000)
        if before.owner(f"k{i}").name == frm and after.owner(f"k{i}").name == to
    ]
    assert len(out) >= n
    return out[:n]


@pytest.fixture
def joined() -> tuple[Cluster, Ring, Ring]:
    """a and b hold keys; then c joins."""
    cl = Cluster("a", "b", "c")
    r1 = cl.ring("a", "b")
    cl.install(r1)
    r2 = cl.ring("a", "b", "c")
    return cl, r1, r2


def test_a_join_demotes_moved_entries_and_a_miss_hands_them_off(joined):
    cl, r1, r2 = joined
    key = moved_keys(r1, r2, "a", "c")[0]
    v1 = put(cl["a"], key, b"hello").version
    cl.install(r2)
    got, _ = get(cl["a"], key)
    assert not got.found  # demoted (judged when met): no longer served to clients
    assert (cl["a"].stat().demoted, cl["a"].stat().keys) == (1, 0)
    got, data = get(cl["a"], key, handoff=True)
    assert got.found and data == b"hello"  # but still to handoffs

    got, data = get(cl["c"], key)
    assert got.found and data == b"hello"
    assert got.version == v1
    assert got.stamp == r1.epoch
    assert cl["c"].stat().handoffs == 1
    cl.peers.gets.clear()
    got, _ = get(cl["c"], key)
    assert got.found and not cl.peers.gets  # stored: the next get is local
    assert cl["c"].stat().handoffs == 1


def test_a_miss_with_one_previous_owner_asks_it_once_for_the_bytes(joined):
    """ "Newest wins" with one contender needs no versions first: one round trip."""
    cl, r1, r2 = joined
    key = moved_keys(r1, r2, "a", "c")[0]
    put(cl["a"], key, b"hello")
    cl.install(r2)
    cl.peers.gets.clear()
    got, data = get(cl["c"], key)
    assert got.found and data == b"hello"
    assert [(address, req.head_only) for address, req in cl.peers.gets] == [("a", False)]


def test_no_handoff_after_the_window_or_for_keys_not_owned(joined):
    cl, r1, r2 = joined
    moved = moved_keys(r1, r2, "a", "c", n=2)
    for key in moved:
        put(cl["a"], key, b"v")
    cl.install(r2)
    assert not get(cl["b"], moved[0])[0].found  # b does not own it: no handoff
    cl.clock.now += cl["c"].rings.window_s
    assert not get(cl["c"], moved[1])[0].found
    assert cl["c"].stat().handoffs == 0


def test_an_unreachable_previous_owner_is_a_miss(joined):
    cl, r1, r2 = joined
    key = moved_keys(r1, r2, "a", "c")[0]
    put(cl["a"], key, b"v")
    cl.install(r2)
    cl.peers.down.add("a")
    got, _ = get(cl["c"], key)
    assert not got.found


def test_a_delete_in_the_window_is_never_undone_by_a_handoff(joined):
    cl, r1, r2 = joined
    key = moved_keys(r1, r2, "a", "c")[0]
    put(cl["a"], key, b"old")
    cl.install(r2)
    assert not delete(cl["c"], key)
    assert not get(cl["c"], key)[0].found
    assert cl["c"].stat().handoffs == 0


def test_first_write_at_a_new_owner_continues_the_key_s_versions(joined):
    cl, r1, r2 = joined
    key = moved_keys(r1, r2, "a", "c")[0]
    far = 2**60  # an old owner whose clock ran far ahead
    assert put(cl["a"], key, b"old", version=far).version == far
    cl.install(r2)
    with pytest.raises(VersionConflict, match=str(far)):
        put(cl["c"], key, b"new", if_version=0)  # the key exists, elsewhere
    v2 = put(cl["c"], key, b"new", if_version=far).version
    assert v2 > far
    got, data = get(cl["c"], key)
    assert (got.version, data) == (v2, b"new")
    assert cl["c"].stat().handoffs == 0  # a handoff never replaces a newer write


def test_a_handoff_keeps_a_newer_value_written_meanwhile(joined):
    cl, r1, r2 = joined
    key = moved_keys(r1, r2, "a", "c")[0]
    v1 = put(cl["a"], key, b"old").version
    cl.install(r2)
    v2 = put(cl["c"], key, b"new").version
    assert v2 > v1
    # A replica/handoff write of the old version: kept_newer, no change.
    result = put(cl["c"], key, b"old", version=v1)
    assert result.kept_newer and result.version == v2
    assert get(cl["c"], key)[1] == b"new"


def test_a_key_that_comes_back_drops_its_demoted_copy(joined):
    cl, r1, r2 = joined
    key = moved_keys(r1, r2, "a", "c")[0]
    put(cl["a"], key, b"v1")
    cl.install(r2)
    v2 = put(cl["c"], key, b"v2").version  # written at c while a held v1 demoted
    r3 = cl.ring("a", "b")  # c leaves (no drain): a owns the key again
    cl.install(r3, "a", "b")
    got, data = get(cl["a"], key)  # never v1: handed off from c, or a miss
    assert got.found and (got.version, data) == (v2, b"v2")
    assert cl["a"].stat().discarded == 1  # v1 hidden, kept as a maybe-last copy
    assert cl["a"].stat().evictions == 0  # not the byte budget: its own counter


def test_namespace_invalidation_hides_older_entries(joined):
    cl, r1, _ = joined
    owner = cl[r1.owner("model/w").name]
    put(owner, "model/w", b"old")
    put(owner, "other", b"keep")
    r2 = cl.ring("a", "b", invalidations={"model/": cl.epoch + 1})
    cl.install(r2)
    assert not get(owner, "model/w")[0].found
    assert owner.stat().invalidated == 1
    assert get(owner, "other")[0].found
    put(owner, "model/w", b"new", if_version=0)  # invalidated: absent
    assert get(owner, "model/w")[1] == b"new"  # stamped at the new epoch


def test_first_write_of_an_epoch_fences_the_other_members_once(joined):
    cl, _, r2 = joined
    cl.install(r2)
    cl.peers.fences.clear()
    cl.peers.down.add("b")  # unreachable: presumed dead, the write goes on
    put(cl["a"], "x", b"1")
    assert sorted(cl.peers.fences) == [("b", r2.epoch), ("c", r2.epoch)]
    put(cl["a"], "y", b"2")
    assert len(cl.peers.fences) == 2
    assert cl["a"].fencer.fenced == r2.epoch


def test_fence_asks_the_router_only_when_behind(joined):
    cl, r1, _ = joined
    cl.synced.clear()
    assert cl["b"].fence(pb.FenceRequest(epoch=r1.epoch)).epoch == r1.epoch
    assert cl.synced == []
    cl["b"].fence(pb.FenceRequest(epoch=r1.epoch + 5))
    assert cl.synced == [("b", r1.epoch + 5)]


def test_handoff_requests_skip_the_epoch_check(joined):
    cl, r1, r2 = joined
    cl.install(r2)
    req = pb.GetRequest(epoch=r1.epoch, keys=[pb.EntryKey(key=b"k")])
    with pytest.raises(StaleEpoch):
        cl["a"].get(req)
    req.handoff = True
    reply, _, _ = cl["a"].get(req)
    assert not reply.entries[0].found


def test_commits_and_deletes_are_published_as_key_events(joined):
    cl, _, _ = joined
    v1 = put(cl["a"], "t", b"1").version
    put(cl["a"], "t", b"0", version=v1 - 1)  # kept the newer one: no event
    delete(cl["a"], "t")
    assert cl.events["a"].seen == [("t", v1), ("t", 0)]


def test_drain_hands_entries_to_their_new_owners(joined):
    cl, r1, _ = joined
    keys = [f"d{i}" for i in range(50)]
    written = {}
    for key in keys:
        node = cl[r1.owner(key).name]
        written[key] = put(node, key, key.encode())
    leaving = cl["a"]
    mine = [k for k in keys if r1.owner(k).name == "a"]
    r2 = cl.ring("b", "c")
    cl.install(r2)
    assert leaving.drain(lambda: r2, timeout_s=10) == len(mine)
    assert leaving.stat().drained == len(mine)
    for key in mine:
        got, data = get(cl[r2.owner(key).name], key)
        assert got.found and data == key.encode()
        assert (got.version, got.stamp) == (written[key].version, r1.epoch)


def test_drain_goes_on_past_a_dead_target(joined):
    cl, r1, _ = joined
    keys = [f"d{i}" for i in range(60)]
    for key in keys:
        put(cl[r1.owner(key).name], key, b"x")
    r2 = cl.ring("b", "c")
    cl.install(r2)
    cl.peers.down.add("b")
    to_c = [k for k in keys if r1.owner(k).name == "a" and r2.owner(k).name == "c"]
    assert cl["a"].drain(lambda: r2, timeout_s=1) == len(to_c)


def test_a_delete_during_a_handoff_in_flight_wins(joined):
    cl, r1, r2 = joined
    key = moved_keys(r1, r2, "a", "c")[0]
    put(cl["a"], key, b"old")
    cl.install(r2)
    real_get = cl.peers.get

    def get_then_delete(address, request, timeout):
        answer = real_get(address, request, timeout)
        delete(cl["c"], key)  # lands while the handoff is on its way back
        return answer

    cl.peers.get = get_then_delete
    assert not get(cl["c"], key)[0].found
    cl.peers.get = real_get
    assert not get(cl["c"], key)[0].found
    assert cl["c"].stat().handoffs == 0


def test_fill_finds_a_key_its_previous_owner_holds(joined):
    cl, r1, r2 = joined
    key = moved_keys(r1, r2, "a", "c")[0]
    put(cl["a"], key, b"v")
    cl.install(r2)
    reply = cl["c"].fill(pb.FillRequest(epoch=r2.epoch, key=key.encode(), holder="h", ttl_ms=1000))
    assert reply.found and not reply.granted
    assert get(cl["c"], key)[0].found


def test_drain_sends_the_most_recently_used_entries_first(joined):
    cl, r1, _ = joined
    mine = [f"d{i}" for i in range(200) if r1.owner(f"d{i}").name == "a"][:5]
    for key in mine:
        put(cl["a"], key, b"x")
    get(cl["a"], mine[0])  # the hottest now
    sent: list[bytes] = []
    real_put = cl.peers.put

    def recording_put(address, request, payload, timeout):
        sent.extend(e.key for e in request.entries)
        return real_put(address, request, payload, timeout)

    cl.peers.put = recording_put
    r2 = cl.ring("b")  # one target: one ordered stream
    cl.install(r2)
    assert cl["a"].drain(lambda: r2, timeout_s=10) == len(mine)
    assert [k.decode() for k in sent] == [mine[0], *reversed(mine[1:])]


# ------------------------------------------------------------------ re-replication
def _ring(epoch: int, *members: tuple[str, str], replicas: int = 2) -> Ring:
    return Ring(
        epoch,
        [RingMember(n, a, 1 << 30) for n, a in members],
        replicas=replicas,
        weight_unit=1 << 30,
    )


def test_a_chain_of_joins_moves_every_key_to_its_newest_owner():
    """Put at epoch 1 on a alone; b and c join before any scan runs: one scan
    of a's entries sends each to its owner in the newest ring (#8)."""
    cl = Cluster("a", "b", "c")
    r1 = cl.ring("a")
    cl.install(r1)
    keys = [f"k{i}" for i in range(60)]
    versions = {k: put(cl["a"], k, k.encode()).version for k in keys}
    r2 = cl.ring("a", "b")
    cl.install(r2)
    r3 = cl.ring("a", "b", "c")
    cl.install(r3)
    away = [k for k in keys if r3.owner(k).name != "a"]
    assert {r3.owner(k).name for k in away} == {"b", "c"}
    assert cl["a"].rebalancer.scan_now() == len(away)
    stat = cl["a"].stat()
    assert (stat.moved, stat.demoted, stat.keys) == (len(away), 0, len(keys) - len(away))
    assert stat.rereplicated == len(away) and stat.evictions == 0
    cl.peers.gets.clear()
    for key in keys:
        got, data = get(cl[r3.owner(key).name], key)
        assert got.found and data == key.encode() and got.version == versions[key]
    assert not cl.peers.gets  # pushed, not handed off on a miss
    assert cl["a"].rebalancer.scan_now() == 0  # nothing left to do


def test_a_scan_refills_new_replicas_and_restarted_incarnations():
    cl = Cluster("a", "b", "c", "d")

    def ring(*members: tuple[str, int]) -> Ring:
        cl.epoch += 1
        return Ring(
            cl.epoch,
            [RingMember(n, n, 1, incarnation=i) for n, i in members],
            weight_unit=1,
            replicas=2,
        )

    r1 = ring(("a", 1), ("b", 1), ("c", 1))
    cl.install(r1)
    keys = [f"k{i}" for i in range(200)]
    mine = [k for k in keys if "a" in {m.name for m in r1.replica_set(k)}]
    for key in mine:  # what a client does at R=2: every replica gets the write
        version = put(cl["a"], key, b"v").version
        for m in r1.replica_set(key):
            if m.name != "a":
                put(cl[m.name], key, b"v", version=version)
    assert cl["a"].rebalancer.scan_now() == 0  # every replica holds its copies
    r2 = ring(("a", 1), ("b", 2), ("c", 1), ("d", 1))  # d joins; b restarted (empty)
    cl.install(r2)

    def inc(ring: Ring, key: str) -> set[tuple[str, str, int]]:
        return {m.incarnation_key for m in ring.replica_set(key)}

    # A key whose replica set changed (d in it, or the restarted b) goes to
    # every other member of its new set: who else held it was only assumed.
    want = [
        (k, m.name)
        for k in mine
        if inc(r1, k) != inc(r2, k)
        for m in r2.replica_set(k)
        if m.name != "a"
    ]
    assert any(name == "d" for _, name in want) and any(name == "b" for _, name in want)
    assert cl["a"].rebalancer.scan_now() == len(want)
    for key, name in want:
        assert get(cl[name], key)[0].found


def test_a_leaving_node_refuses_pushes(joined):
    cl, r1, _ = joined
    cl["c"].leaving = True
    meta = pb.TensorMeta(dtype="|u1", shape=[1], order="C", nbytes=1, crc32c=codec.crc32c(b"v"))
    push = pb.PutRequest(
        epoch=0, entries=[pb.EntryPut(key=b"k", meta=meta, version=5, stamp=r1.epoch)]
    )
    with pytest.raises(Unavailable, match="leaving"):
        cl.peers.put("c", push, [b"v"], 1.0)
    assert put(cl["c"], "k", b"v").version  # a client's own write is judged by its epoch


def test_a_handoff_takes_the_newest_copy_among_the_previous_owners():
    """A replica that missed writes (paused, cut off) holds an old copy: a miss at
    the key's new owner must not take it because it answered first."""
    cl = Cluster("a", "b", "c")

    def ring(*names: str) -> Ring:
        cl.epoch += 1
        return Ring(cl.epoch, [RingMember(n, n, 1) for n in names], weight_unit=1, replicas=2)

    r1 = ring("a", "b")
    cl.install(r1)
    r2 = ring("a", "b", "c")
    key = next(
        f"k{i}"
        for i in range(5000)
        if r1.replica_set(f"k{i}")[0].name == "b"
        and "c" in {m.name for m in r2.replica_set(f"k{i}")}
    )
    old = put(cl["b"], key, b"old").version
    new = put(cl["a"], key, b"new", version=old + 10).version  # b missed this one
    cl.install(r2)
    owner = next(m.name for m in r2.replica_set(key) if m.name == "c")
    got, data = get(cl[owner], key)
    assert got.found and (got.version, data) == (new, b"new")


@pytest.mark.parametrize("meanwhile", ["nothing", "newer", "deleted"])
def test_a_node_back_from_a_gap_serves_its_copies_only_if_nobody_outdid_them(meanwhile):
    """Back from a pause past its lease, a node cannot know what happened to its
    keys while the ring went on without it. Its copies are hidden until a read
    asks who held the keys meanwhile: a newer copy wins, a delete drops ours,
    and with neither ours is served again (it may be the last one)."""
    cl = Cluster("a", "b")
    r1 = cl.ring("a", "b")
    cl.install(r1)
    key = next(f"k{i}" for i in range(1000) if r1.owner(f"k{i}").name == "a")
    v1 = put(cl["a"], key, b"v1").version
    cl["a"].rings.mark_gap()  # a is paused; the ring goes on without it
    cl.install(cl.ring("b"), "b")
    if meanwhile == "newer":
        put(cl["b"], key, b"v2")
    elif meanwhile == "deleted":
        put(cl["b"], key, b"v2")
        assert delete(cl["b"], key)
    cl.install(cl.ring("a", "b"))  # a is back
    got, data = get(cl["a"], key)
    stat = cl["a"].stat()
    if meanwhile == "nothing":
        assert got.found and (got.version, data) == (v1, b"v1")
        assert (stat.revived, stat.discarded) == (1, 0)
    elif meanwhile == "newer":
        assert got.found and data == b"v2" and got.version > v1
        assert (stat.revived, stat.discarded) == (0, 1)
    else:
        assert not got.found  # never v1 again
        assert (stat.revived, stat.discarded) == (0, 1)


@pytest.mark.parametrize("peer", ["up", "down"])
def test_a_gap_copy_asks_its_co_replicas_and_stays_hidden_while_one_is_silent(peer):
    """At R=2 the key's other current replica took the writes made while this
    node was away: it must be asked too (it was not, as a current replica, and
    the soak read the old copy back). If it cannot answer, the copy is not
    served: it stays hidden until a read or the scan can decide."""
    cl = Cluster("a", "b")

    def ring(*names: str) -> Ring:
        cl.epoch += 1
        return Ring(cl.epoch, [RingMember(n, n, 1) for n in names], weight_unit=1, replicas=2)

    cl.install(ring("a", "b"))
    v1 = put(cl["a"], "k", b"v1").version
    put(cl["b"], "k", b"v1", version=v1)
    cl["a"].rings.mark_gap()  # a is paused; the ring goes on without it
    cl.install(ring("b"), "b")
    v2 = put(cl["b"], "k", b"v2").version
    cl.install(ring("a", "b"))  # a is back: b is its co-replica, not a previous owner
    if peer == "down":
        cl.peers.down.add("b")
        got, _ = get(cl["a"], "k")
        assert not got.found  # never v1: b may hold newer
        stat = cl["a"].stat()
        assert (stat.revived, stat.discarded, stat.demoted) == (0, 0, 1)  # undecided, kept
        cl.peers.down.discard("b")
    got, data = get(cl["a"], "k")
    assert got.found and (got.version, data) == (v2, b"v2")
    assert cl["a"].stat().discarded == 1


def test_a_push_does_not_settle_its_key_so_a_later_push_is_taken():
    """A node that got a key by push, then moved it on, must take the next push
    of it: answering "kept newer" while holding nothing made its sender drop the
    last copy (found by the soak)."""
    cl = Cluster("a", "b", "c")
    r1 = cl.ring("a", "b")
    cl.install(r1)
    cl.install(cl.ring("a", "b", "c"))  # c joins: within the handoff window now
    meta = pb.TensorMeta(dtype="|u1", shape=[1], order="C", nbytes=1, crc32c=codec.crc32c(b"v"))

    def push(to: str, version: int) -> pb.PutResult:
        req = pb.PutRequest(
            epoch=0, entries=[pb.EntryPut(key=b"k", meta=meta, version=version, stamp=r1.epoch)]
        )
        return cl.peers.put(to, req, [b"v"], 1.0).results[0]

    assert push("c", 10).version == 10
    assert cl["c"].store.delete((0, "k")) is not None  # c moved it on (not a client delete)
    again = push("c", 10)
    assert (again.version, again.kept_newer) == (10, False)  # taken, not "kept newer"
    assert delete(cl["c"], "k")  # a client's delete does settle it:
    ignored = push("c", 10)
    assert (ignored.version, ignored.kept_newer) == (0, True)  # never brought back


def test_a_key_written_here_takes_its_own_value_back_but_never_an_older_one(joined):
    """The soak's case: a client wrote k here, the ring moved it away and back;
    the push of that same value must be taken (not answered "kept newer" while
    nothing is held), an older copy still never."""
    cl, r1, r2 = joined
    key = moved_keys(r1, r2, "a", "c")[0]
    cl.install(r2)
    written = put(cl["c"], key, b"new").version  # a client's write at c: settled there
    older = written - 5
    assert cl["c"].store.delete((0, key)) is not None  # moved on from c (no client delete)
    meta = pb.TensorMeta(dtype="|u1", shape=[3], order="C", nbytes=3, crc32c=codec.crc32c(b"new"))

    def push(version: int, payload: bytes) -> pb.PutResult:
        meta.crc32c = codec.crc32c(payload)
        req = pb.PutRequest(
            epoch=0, entries=[pb.EntryPut(key=key.encode(), meta=meta, version=version, stamp=1)]
        )
        return cl.peers.put("c", req, [payload], 1.0).results[0]

    stale = push(older, b"old")
    assert stale.kept_newer and stale.version == 0  # older than the write: ignored
    back = push(written, b"new")
    assert (back.version, back.kept_newer) == (written, False)  # its own value: taken
    assert get(cl["c"], key)[1] == b"new"


def test_fill_is_not_granted_for_a_key_committed_between_its_look_and_its_grant(joined):
    # The owner looks for the key, then takes the lease. A put that commits
    # in between ends the previous holder's lease, so nothing refuses the
    # asker: without a second look it is granted and loads a present key.
    cl, r1, _ = joined
    key = next(f"f{i}" for i in range(200) if r1.owner(f"f{i}").name == "a")
    node = cl["a"]
    first = pb.FillRequest(epoch=r1.epoch, key=key.encode(), holder="h1", ttl_ms=5000)
    assert node.fill(first).granted
    real_acquire = node.fills.acquire

    def commit_first(*args, **kwargs):
        put(node, key, b"filled by h1")  # h1's put: commits, ends h1's lease
        return real_acquire(*args, **kwargs)

    node.fills.acquire = commit_first
    reply = node.fill(pb.FillRequest(epoch=r1.epoch, key=key.encode(), holder="h2", ttl_ms=5000))
    node.fills.acquire = real_acquire
    assert reply.found and not reply.granted
    assert node.fills.holder(key) is None  # h2 holds nothing it would have to release


@pytest.mark.parametrize(
    ("raw", "kind", "message"),
    [
        (b"", pb.TENSOR, r"^keys\[2\]\.key is empty"),
        (b"\xff", pb.TENSOR, r"^keys\[2\]\.key is not valid UTF-8"),
        (b"x" * 1025, pb.TENSOR, r"^keys\[2\]\.key is 1025 bytes, more than the limit"),
        (b"k", 7, r"^keys\[2\]\.kind 7 is not a known EntryKind"),
    ],
)
def test_a_bad_key_among_good_ones_is_named_by_its_index(raw, kind, message):
    """The batch key check (good keys checked inline, #18) names the bad one exactly."""
    c = Cluster("a")
    c.install(c.ring("a"))
    ops = c["a"]
    put(ops, "good", b"abc")
    keys = [pb.EntryKey(key=b"good"), pb.EntryKey(key=b"\0\x01", kind=pb.SHARD)]
    keys.append(pb.EntryKey(key=raw, kind=kind))  # type: ignore[arg-type]  # an unknown kind on purpose
    with pytest.raises(InvalidArgument, match=message):
        ops.get(pb.GetRequest(epoch=ops.epochs.epoch, keys=keys))
    with pytest.raises(InvalidArgument, match=message):
        ops.delete(pb.DeleteRequest(epoch=ops.epochs.epoch, keys=keys))
    reply, payload, _ = ops.get(pb.GetRequest(epoch=ops.epochs.epoch, keys=keys[:2]))
    assert [e.found for e in reply.entries] == [True, False]
    assert [bytes(c) for e in payload for c in e.chunks] == [b"abc"]


def _manifest(ops: NodeOps, key: str, put_id: int, **entry: int) -> pb.PutResult:
    """Commit a manifest of two 4-byte stripes of put ``put_id`` (no payload)."""
    meta = pb.TensorMeta(dtype="|u1", shape=[8], order="C", nbytes=8, put_id=put_id)
    for i in range(2):
        meta.stripes.add(key=f"{key}\0{put_id:016x}\0{i}".encode(), offset=4 * i, nbytes=4)
    req = pb.PutRequest(
        epoch=ops.epochs.epoch, entries=[pb.EntryPut(key=key.encode(), meta=meta, **entry)]
    )
    plan = ops.plan_put(req)
    try:
        return ops.finish_put(plan, [()], [0]).results[0]
    finally:
        ops.abort_put(plan)


def test_a_resent_manifest_reports_none_of_its_own_stripes_as_replaced():
    """The client frees what a put reports as replaced (issue #8, found by the soak).

    A put resent after its reply was lost replaces its own first commit:
    the stripes are the same, and naming them made the client delete the
    value it had just written. A manifest of another put names its old
    stripes, as before; so does an exact-version copy (a replica write).
    """
    c = Cluster("a")
    c.install(c.ring("a"))
    first = _manifest(c["a"], "m", 7)
    assert not first.replaced_stripes
    again = _manifest(c["a"], "m", 7)  # the resend
    assert again.version > first.version and not again.replaced_stripes
    newer = _manifest(c["a"], "m", 9)  # another put of the key: its stripes are garbage
    assert [r.key for r in newer.replaced_stripes] == [
        b"m\0" + b"%016x" % 7 + b"\0%d" % i for i in range(2)
    ]
    copy = _manifest(c["a"], "m", 9, version=newer.version + 1)  # a replica write of it
    assert not copy.replaced_stripes


def test_first_read_of_an_epoch_fences_the_old_owners(joined):
    """A new owner's reads and a stale writer's writes cannot interleave (found by the soak).

    c joins and serves a key that moved to it, fetched from its previous
    owner, while the previous owner has not heard of the new ring. Unfenced,
    a writer still on the old ring wrote the key there again, and c went on
    serving the copy it had fetched: a read after a completed write returned
    the older value. Now c's first read of its epoch fences its peers: the
    old owner refuses the stale writer, who refreshes and writes to c.
    """
    cl, r1, r2 = joined
    key = moved_keys(r1, r2, "a", "c", 1)[0]
    v1 = put(cl["a"], key, b"old").version
    cl.router = r2
    cl.install(r2, "c")  # only c knows the new ring yet
    got, data = get(cl["c"], key)
    assert got.found and got.version == v1 and data == b"old"  # from a, its previous owner
    assert cl["a"].epochs.epoch == r2.epoch  # fenced by c's first read
    with pytest.raises(StaleEpoch):  # the writer still on r1 must refresh
        cl["a"].plan_put(
            pb.PutRequest(
                epoch=r1.epoch,
                entries=[
                    pb.EntryPut(
                        key=key.encode(),
                        meta=pb.TensorMeta(dtype="|u1", shape=[3], order="C", nbytes=3),
                    )
                ],
            )
        )
    v2 = put(cl["c"], key, b"new").version  # where the refreshed writer's put lands
    assert v2 > v1
    got, data = get(cl["c"], key)
    assert (got.version, data) == (v2, b"new")


def test_a_conditional_put_resent_with_its_put_id_gets_its_first_version():
    """A resend after a lost reply is answered, not refused as a conflict; another put is."""
    c = Cluster("a")
    c.install(c.ring("a"))
    crc = codec.crc32c(b"v1")

    def send(put_id: int) -> pb.PutResult:
        meta = pb.TensorMeta(dtype="|u1", shape=[2], order="C", nbytes=2, crc32c=crc, put_id=put_id)
        req = pb.PutRequest(
            epoch=c["a"].epochs.epoch,
            entries=[pb.EntryPut(key=b"cas", meta=meta, if_version=0)],
        )
        plan = c["a"].plan_put(req)
        try:
            return c["a"].finish_put(plan, [(b"v1",)], [crc]).results[0]
        finally:
            c["a"].abort_put(plan)

    first = send(77)
    events = len(c.events["a"].seen)
    again = send(77)  # the same put, resent: its first version, nothing stored again
    assert again.version == first.version and not again.kept_newer
    assert len(c.events["a"].seen) == events  # no second key event
    assert c["a"].store.stats().bytes_reserved == 0
    with pytest.raises(VersionConflict):  # another put of the key still conflicts
        send(78)
