"""The node's receive pool: a block is reused only once nothing refers to it."""

from __future__ import annotations

import pytest

from tensorcache.node.recvpool import MIN_POOLED, RecvPool

MIB = 1024 * 1024


def test_a_dropped_buffer_is_reused() -> None:
    pool = RecvPool(16 * MIB)
    a = pool.take(4 * MIB)
    a[:] = 1
    addr = a.ctypes.data
    del a
    b = pool.take(4 * MIB)
    assert b.ctypes.data == addr
    assert (pool.created, pool.reused) == (1, 1)


def test_a_buffer_in_use_is_never_handed_out_twice() -> None:
    pool = RecvPool(64 * MIB)
    stored = (pool.take(4 * MIB),)  # as the store holds a chunk: in a tuple
    other = pool.take(4 * MIB)
    assert other.ctypes.data != stored[0].ctypes.data
    assert pool.reused == 0


@pytest.mark.parametrize(
    "keep",
    [
        lambda a: a[10:20],  # a numpy view: its base is the block itself
        lambda a: memoryview(a)[5:],  # a send in flight
        lambda a: a.reshape(2, -1),
    ],
)
def test_a_view_outliving_the_chunk_keeps_the_block(keep) -> None:  # type: ignore[no-untyped-def]
    pool = RecvPool(64 * MIB)
    a = pool.take(4 * MIB)
    addr = a.ctypes.data
    view = keep(a)
    del a
    b = pool.take(4 * MIB)
    assert b.ctypes.data != addr  # the view still reads the old bytes
    del view
    del b
    assert pool.free_bytes() == 8 * MIB


def test_only_the_same_size_is_reused() -> None:
    pool = RecvPool(64 * MIB)
    a = pool.take(4 * MIB)
    del a
    b = pool.take(2 * MIB)
    assert b.nbytes == 2 * MIB
    assert (pool.created, pool.reused) == (2, 0)


def test_the_limit_bounds_the_pool_and_free_blocks_make_room() -> None:
    pool = RecvPool(8 * MIB)
    a, b = pool.take(4 * MIB), pool.take(4 * MIB)
    c = pool.take(4 * MIB)  # over the limit, nothing free: plain memory
    assert pool.pooled_bytes() == 8 * MIB
    assert c.nbytes == 4 * MIB and pool.created == 2
    del a
    d = pool.take(2 * MIB)  # the free 4 MiB block is dropped to make room
    assert pool.pooled_bytes() == 6 * MIB
    assert pool.free_bytes() == 0
    del b, c, d


def test_small_buffers_and_an_off_pool_bypass_it() -> None:
    pool = RecvPool(64 * MIB)
    pool.take(MIN_POOLED - 1)
    off = RecvPool(0)
    off.take(4 * MIB)
    assert pool.pooled_bytes() == 0 and off.pooled_bytes() == 0
    with pytest.raises(ValueError, match="limit"):
        RecvPool(-1)


# -- idle buffers count against the node's byte budget ---------------------------


def _budgeted(capacity_mib: int, pool_mib: int):
    from tensorcache.node.store import Store

    store = Store(capacity_mib * MIB)
    pool = RecvPool(pool_mib * MIB)
    store.keep_spare_within_budget(pool)
    return store, pool


def _idle_blocks(pool: RecvPool, n: int) -> None:
    """``n`` 1 MiB blocks made and then dropped: free, held by the pool."""
    blocks = [pool.take(MIB) for _ in range(n)]
    del blocks


def test_idle_buffers_are_given_back_when_the_store_needs_their_room():
    # Without the rule a node holds its whole capacity in entries plus every
    # idle buffer: RSS up to capacity + pool (issue #17's bound broken).
    store, pool = _budgeted(10, 8)
    _idle_blocks(pool, 6)
    assert pool.free_bytes() == 6 * MIB
    res = store.reserve(8 * MIB)
    s = store.stats()
    assert s.bytes_used + s.bytes_reserved + pool.free_bytes() <= s.capacity
    assert pool.free_bytes() == 2 * MIB  # only what did not fit went back
    store.release(res)


def test_idle_buffers_go_before_any_entry_is_evicted():
    from tensorcache.node.store import NewEntry

    store, pool = _budgeted(10, 8)
    res = store.reserve(5 * MIB)
    store.commit(res, [NewEntry((0, "kept"), None, (b"x",), 5 * MIB)])
    _idle_blocks(pool, 5)
    res = store.reserve(5 * MIB)  # fits once the idle buffers are gone
    assert store.stats().evictions == 0
    assert store.contains((0, "kept"))
    assert pool.free_bytes() == 0
    store.release(res)


def test_buffers_in_use_are_never_given_back():
    store, pool = _budgeted(10, 8)
    held = [pool.take(MIB) for _ in range(4)]  # e.g. stored stripes
    store.release(store.reserve(9 * MIB))  # over the cheap bound: looks, finds none idle
    assert pool.pooled_bytes() == 4 * MIB  # nothing in use was dropped
    assert all(b.nbytes == MIB for b in held)
