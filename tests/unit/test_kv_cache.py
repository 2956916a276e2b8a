"""The KV-cache API (tensorcache/kv/cache.py) on the in-memory cluster.

The real client and the real node logic (tensorcache.testing.FakeCluster),
no processes: chunking and the round trip of bytes, first writer wins under
concurrent writers, gaps, a full store, invalidation, bad input. The same
API against real node processes and a real model: tests/integration/test_kv_*.py.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

import pytest
import torch

from tensorcache.client.api import Client
from tensorcache.client.config import ClientConfig
from tensorcache.errors import InvalidArgument
from tensorcache.kv import KVLayout
from tensorcache.testing import FakeCluster

pytestmark = pytest.mark.unit


def layout(**change: Any) -> KVLayout:
    fields: dict[str, Any] = {
        "model_id": "org/unit",
        "revision": "r1",
        "num_layers": 3,
        "num_kv_heads": 2,
        "head_dim": 8,
        "dtype": "bfloat16",
        "chunk_tokens": 4,
        **change,
    }
    return KVLayout(**fields)


def kv_of(lay: KVLayout, tokens: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer K/V of ``tokens`` tokens, (1, heads, tokens, head_dim) as transformers has it."""
    g = torch.Generator().manual_seed(seed)
    shape = (1, lay.num_kv_heads, tokens, lay.head_dim)
    dtype = getattr(torch, lay.dtype)
    return [
        (torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype))
        for _ in range(lay.num_layers)
    ]


TOKENS = list(range(100, 118))  # 18 tokens: 4 full chunks of 4 and a tail of 2


def test_put_match_get_round_trip_exactly() -> None:
    lay = layout()
    with FakeCluster(3) as cluster:
        kv = cluster.connect().kv(lay)
        assert kv.match(TOKENS) == 0
        layers = kv_of(lay, 18)
        report = kv.put_prefix(TOKENS, layers)
        assert (report.chunks, report.stored, report.present, report.dropped) == (4, 4, 0, 0)
        assert kv.match(TOKENS) == 16
        assert kv.match(TOKENS[:11]) == 8  # a shorter prompt: its full chunks
        assert kv.match([*TOKENS[:8], 0, 0, 0, 0]) == 8  # diverges in chunk 3
        got = kv.get_prefix(TOKENS, 16)
        assert got.tokens == 16
        for (k, v), (gk, gv) in zip(layers, got.layers, strict=True):
            assert gk.dtype == torch.bfloat16 and gk.shape == (2, 16, 8)
            assert torch.equal(gk, k[0, :, :16]) and torch.equal(gv, v[0, :, :16])
        part = kv.get_prefix(TOKENS, 6)  # not a chunk multiple: a slice of chunk 2
        assert part.tokens == 6 and torch.equal(part.layers[2][1], layers[2][1][0, :, :6])
        # Another process's view: a second client of the same cluster.
        other = cluster.connect().kv(lay)
        assert other.match(TOKENS) == 16
        assert other.put_prefix(TOKENS, layers).present == 4  # nothing rewritten


def test_get_prefix_into_preallocated_buffers() -> None:
    lay = layout(dtype="float32")
    with FakeCluster(2) as cluster:
        kv = cluster.connect().kv(lay)
        layers = kv_of(lay, 16)
        kv.put_prefix(TOKENS, layers)
        out = [(torch.full((1, 2, 32, 8), -1.0), torch.full((1, 2, 32, 8), -1.0)) for _ in range(3)]
        got = kv.get_prefix(TOKENS, 12, out=out)
        assert got.tokens == 12
        for (k, v), (ok, ov), (gk, _) in zip(layers, out, got.layers, strict=True):
            assert torch.equal(ok[0, :, :12], k[0, :, :12]) and torch.equal(
                ov[0, :, :12], v[0, :, :12]
            )
            assert bool((ok[0, :, 12:] == -1).all())  # nothing past n was written
            assert gk.data_ptr() == ok.data_ptr()  # a view of the caller's buffer
        with pytest.raises(InvalidArgument, match=r"out\[0\]\[0\] holds 8 tokens, fewer than 12"):
            kv.get_prefix(TOKENS, 12, out=[(torch.zeros(2, 8, 8), torch.zeros(2, 8, 8))] * 3)


def test_a_missing_middle_chunk_is_a_gap() -> None:
    lay = layout()
    with FakeCluster(3) as cluster:
        c = cluster.connect()
        kv = c.kv(lay)
        layers = kv_of(lay, 16)
        kv.put_prefix(TOKENS, layers)
        assert c.delete(kv.keys(TOKENS)[1])  # chunk 1 gone (as if evicted)
        assert kv.match(TOKENS) == 4
        got = kv.get_prefix(TOKENS, 16)  # asked for more than is there: a short read
        assert got.tokens == 4 and got.layers[0][0].shape == (2, 4, 8)
        assert kv.metrics()["short_reads"] == 1
        # Storing again fills the gap only.
        report = kv.put_prefix(TOKENS, layers)
        assert (report.stored, report.present) == (1, 3)
        assert kv.match(TOKENS) == 16


class CountingNodes:
    """The fake cluster's node transport, counting head calls per node."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.heads: Counter[str] = Counter()

    def head(self, member: Any, epoch: int, batch: list[Any]) -> None:
        self.heads[member.name] += 1
        self.inner.head(member, epoch, batch)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_match_costs_one_head_call_per_node_not_per_chunk() -> None:
    lay = layout(chunk_tokens=1)
    tokens = list(range(200))  # 200 chunks over 3 nodes
    with FakeCluster(3) as cluster:
        nodes = CountingNodes(cluster.transport)
        c = Client(cluster.router.address, ClientConfig(), nodes=nodes, control=cluster.router)
        kv = c.kv(lay)
        kv.put_prefix(tokens, kv_of(lay, 200))
        nodes.heads.clear()
        assert kv.match(tokens) == 200
        assert sum(nodes.heads.values()) == 3 and set(nodes.heads) == {"node-0", "node-1", "node-2"}
        c.close()


def test_concurrent_writers_of_the_same_chunks_first_wins() -> None:
    lay = layout(dtype="float32")
    with FakeCluster(3) as cluster:
        clients = [cluster.connect() for _ in range(4)]
        layers = kv_of(lay, 16)
        barrier = threading.Barrier(4)
        reports: list[Any] = []

        def write(c: Client, seed: int) -> None:
            barrier.wait(timeout=30)
            reports.append(c.kv(lay).put_prefix(TOKENS, layers))

        threads = [threading.Thread(target=write, args=(c, i)) for i, c in enumerate(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert len(reports) == 4
        # Every chunk stored exactly once in all; the others saw it there.
        assert sum(r.stored for r in reports) == 4
        assert all(r.stored + r.present == 4 and r.dropped == 0 for r in reports)
        versions = clients[0].versions(clients[0].kv(lay).keys(TOKENS))
        got = clients[1].kv(lay).get_prefix(TOKENS)
        assert all(v is not None for v in versions.values())
        assert torch.equal(got.layers[1][0], layers[1][0][0, :, :16])


def test_a_full_store_evicts_and_says_so_never_raises() -> None:
    lay = layout(dtype="float32", num_layers=2, num_kv_heads=2, head_dim=64, chunk_tokens=16)
    chunk = lay.chunk_nbytes  # 16 KiB
    with FakeCluster(1, capacity=6 * chunk) as cluster:
        c = cluster.connect()
        kv = c.kv(lay)
        prompts = [[p] * 64 for p in range(4)]  # 4 chunks each: 16 in all, room for ~5
        for i, p in enumerate(prompts):
            r = kv.put_prefix(p, kv_of(lay, 64, seed=i))
            assert (r.stored, r.dropped) == (4, 0)
        assert c.stats()[0].evictions > 0
        assert kv.match(prompts[3]) == 64  # the newest is whole
        assert kv.match(prompts[0]) < 64  # the oldest lost chunks (LRU)
        # A chunk larger than the node: dropped, reported, not raised.
        big = layout(dtype="float32", num_layers=2, num_kv_heads=2, head_dim=64, chunk_tokens=128)
        r = c.kv(big).put_prefix([1] * 256, kv_of(big, 256))
        assert (r.chunks, r.stored, r.dropped) == (2, 0, 2)
        assert "capacity" in r.reason
        assert c.kv(big).match([1] * 256) == 0


def test_invalidate_drops_the_layout_or_the_model() -> None:
    a, b, other_rev = layout(), layout(tp_size=2, tp_rank=1), layout(revision="r2")
    with FakeCluster(2) as cluster:
        c = cluster.connect()
        for lay in (a, b, other_rev):
            c.kv(lay).put_prefix(TOKENS, kv_of(lay, 16))
        c.kv(a).invalidate()
        assert c.kv(a).match(TOKENS) == 0
        assert c.kv(a).get_prefix(TOKENS).tokens == 0
        assert c.kv(b).match(TOKENS) == 16  # another layout: untouched
        c.kv(b).invalidate(scope="model")
        assert c.kv(b).match(TOKENS) == 0 and c.kv(other_rev).match(TOKENS) == 0
        # Stored again after the invalidation: visible.
        c.kv(a).put_prefix(TOKENS, kv_of(a, 16))
        assert c.kv(a).match(TOKENS) == 16
        with pytest.raises(InvalidArgument, match="scope"):
            c.kv(a).invalidate(scope="all")  # type: ignore[arg-type]


def test_another_layout_is_a_miss() -> None:
    with FakeCluster(2) as cluster:
        c = cluster.connect()
        c.kv(layout()).put_prefix(TOKENS, kv_of(layout(), 16))
        for change in (
            {"revision": "r2"},
            {"dtype": "float16"},
            {"tp_size": 2},
            {"chunk_tokens": 2},
        ):
            assert c.kv(layout(**change)).match(TOKENS) == 0


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda L: L[:2], "has 2 layers, the layout says 3"),
        (
            lambda L: [(k.float(), v) for k, v in L],
            r"per_layer_kv\[0\]\[0\] has dtype torch.float32",
        ),
        (
            lambda L: [(k[:, :1], v) for k, v in L],
            r"has shape \(1, 16, 8\): the layout says \(2, tokens, 8\)",
        ),
        (lambda L: [(k[:, :, :7], v) for k, v in L], r"holds 7 tokens, fewer than 16"),
        (lambda L: [(k.float().numpy(), v) for k, v in L], "must be a torch.Tensor"),
        (lambda L: [(k,) for k, v in L], r"per_layer_kv\[0\] must be a \(key, value\) pair"),
    ],
)
def test_bad_kv_is_refused_and_stores_nothing(mutate: Any, message: str) -> None:
    lay = layout()
    with FakeCluster(2) as cluster:
        kv = cluster.connect().kv(lay)
        with pytest.raises(InvalidArgument, match=message):
            kv.put_prefix(TOKENS, mutate(kv_of(lay, 16)))
        assert kv.match(TOKENS) == 0


def test_bad_reads_are_refused() -> None:
    with FakeCluster(1) as cluster:
        kv = cluster.connect().kv(layout())
        with pytest.raises(InvalidArgument, match="beyond the last full chunk"):
            kv.get_prefix(TOKENS, 17)
        with pytest.raises(InvalidArgument, match="n must be an int"):
            kv.get_prefix(TOKENS, -1)
        with pytest.raises(InvalidArgument, match="not both"):
            kv.get_prefix(TOKENS, 4, device="cpu", out=[])
        with pytest.raises(InvalidArgument, match="layout must be a KVLayout"):
            cluster.connect().kv("org/unit")  # type: ignore[arg-type]


def test_a_stored_value_unlike_the_layout_is_a_miss_never_garbage() -> None:
    lay = layout(dtype="float32")
    with FakeCluster(2) as cluster:
        c = cluster.connect()
        kv = c.kv(lay)
        kv.put_prefix(TOKENS, kv_of(lay, 16))
        keys = kv.keys(TOKENS)
        c.put(keys[1], torch.zeros(3, 2))  # a foreign writer's value under chunk 1's key
        c.put(keys[2], torch.zeros(lay.chunk_shape, dtype=torch.float16))  # wrong dtype
        got = kv.get_prefix(TOKENS, 16)
        assert got.tokens == 4  # chunk 0 only: chunk 1 is not a chunk of this layout
