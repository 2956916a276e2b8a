"""The KV-cache API against real node processes: a full store, racing writers.

The pure logic is in tests/unit/test_kv_cache.py (in-memory cluster); this
checks what depends on the real thing: eviction under a node's byte budget,
the refusal of an entry larger than a node arriving over the wire as
CapacityExceeded and reported (never raised) by put_prefix, and conditional
puts deciding first-writer-wins between separate connections.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest

import tensorcache

torch = pytest.importorskip("torch")

from tensorcache.kv import KVLayout  # noqa: E402

pytestmark = pytest.mark.integration

LAYOUT = KVLayout(
    "test/kv-api", "r1", num_layers=2, num_kv_heads=2, head_dim=64, dtype="float32", chunk_tokens=16
)  # a chunk is 32 KiB


def kv_of(tokens: int, seed: int, layout: KVLayout = LAYOUT) -> list[Any]:
    g = torch.Generator().manual_seed(seed)
    shape = (layout.num_kv_heads, tokens, layout.head_dim)
    return [(torch.randn(shape, generator=g), torch.randn(shape, generator=g)) for _ in range(2)]


def test_a_full_node_evicts_reports_and_never_raises(make_cluster: Any) -> None:
    cluster = make_cluster(1, capacity="256KiB")  # room for about 7 chunks
    with tensorcache.connect(cluster.router_address) as c:
        kv = c.kv(LAYOUT)
        prompts = [[p] * 64 for p in range(5)]  # 4 chunks each, 20 in all
        for i, p in enumerate(prompts):
            r = kv.put_prefix(p, kv_of(64, i))
            assert (r.chunks, r.stored, r.dropped) == (4, 4, 0)
        assert sum(s.evictions for s in c.stats()) > 0
        assert kv.match(prompts[-1]) == 64  # the newest prompt is whole
        assert kv.match(prompts[0]) < 64  # the oldest lost chunks to LRU
        got = kv.get_prefix(prompts[0], 0)
        assert got.tokens == 0
        # Asking for more than is left: a short read, not an error.
        assert kv.get_prefix(prompts[0], 64).tokens == kv.match(prompts[0])
        # A chunk larger than the node: dropped and reported, not raised.
        big = KVLayout(
            "test/kv-api",
            "r1",
            num_layers=2,
            num_kv_heads=2,
            head_dim=64,
            dtype="float32",
            chunk_tokens=256,
        )  # 512 KiB per chunk
        r = c.kv(big).put_prefix([1] * 512, kv_of(512, 9, big))
        assert (r.stored, r.dropped) == (0, 2) and "capacity" in r.reason
        assert c.kv(big).match([1] * 512) == 0
        assert kv.match(prompts[-1]) == 64  # and nothing else was disturbed


def test_racing_writers_on_separate_connections_store_each_chunk_once(cluster: Any) -> None:
    tokens = list(range(1000, 1128))  # 8 chunks
    layers = kv_of(128, 1)
    clients = [tensorcache.connect(cluster.router_address) for _ in range(4)]
    try:
        barrier = threading.Barrier(len(clients))
        reports: list[Any] = []
        lock = threading.Lock()

        def write(c: Any) -> None:
            barrier.wait(timeout=60)
            r = c.kv(LAYOUT).put_prefix(tokens, layers)
            with lock:
                reports.append(r)

        threads = [threading.Thread(target=write, args=(c,)) for c in clients]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert len(reports) == 4
        assert sum(r.stored for r in reports) == 8  # each chunk stored by exactly one writer
        assert all(r.stored + r.present == 8 for r in reports)
        got = clients[3].kv(LAYOUT).get_prefix(tokens)
        assert got.tokens == 128
        assert all(
            torch.equal(gk, k) and torch.equal(gv, v)
            for (gk, gv), (k, v) in zip(got.layers, layers, strict=True)
        )
    finally:
        for c in clients:
            c.close()
