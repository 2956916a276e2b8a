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
