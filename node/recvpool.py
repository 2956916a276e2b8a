"""Receive buffers the node reuses instead of asking the OS for fresh memory.

Why: a put's payload used to land in new memory (``np.empty``), which the
kernel must fault in and zero page by page, and a deleted, evicted or
replaced entry gave its memory back. On the development VM that first touch
is the dominant cost of a put: 85% of a fresh fill's time is the kernel's
``clear_page_erms``, at 0.4-0.9 GB/s (1.2-2.7 s of system time per GiB on
the nodes, against ~0.25 s/GiB for the receive copy itself), because the
hypervisor also backs each page anew (free page reporting hands freed guest
memory back to the host). See docs/performance.md, "The cliff above 2 GiB".

So large receive buffers come from here. A block is free again once nothing
refers to it: not the store (its entry was deleted, evicted or replaced), not
a reply being sent, not a co-located reader's pin. That is read from the
block's reference count (CPython's, exact and immediate), not from a
finalizer: numpy collapses view chains, so a view of a stored chunk refers to
the block directly and outlives the chunk; only the block's own count says
nobody uses it.

The pool holds at most ``limit`` bytes of blocks (in use or free). A request
it cannot serve from a free block of the same size gets a new block while
the limit allows, else plain ``np.empty`` memory (freed as before). Free
blocks of other sizes are dropped to make room, oldest first. Free blocks
count against the node's byte budget: the store gives them back
(``release_free``) when a reservation needs their room, before it evicts
anything (``Store.keep_spare_within_budget``). Sizes: stripes
are the cluster stripe size, so a node mostly sees one size.
"""

from __future__ import annotations

import sys
import threading

import numpy as np

# Below this, malloc serves the buffer from its own free lists (no fresh
# pages), and a scan of the pool would cost more than it saves.
MIN_POOLED = 1024 * 1024


def _refcounts(blocks: list[np.ndarray]) -> list[int]:
    """Each block's reference count, read the same way for calibration and use."""
    return [sys.getrefcount(b) for b in blocks]


# What a block referred to by nothing but the pool's list reads through
# _refcounts (measured, not assumed: interpreters differ in borrowed refs).
_FREE_REFS = _refcounts([np.empty(0, dtype=np.uint8)])[0]


class RecvPool:
    """Reusable uint8 receive buffers, bounded by ``limit`` bytes (thread-safe)."""

    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise ValueError(f"recv pool limit must be >= 0 bytes, got {limit}")
        self.limit = limit
        self._blocks: list[np.ndarray] = []  # every pooled block, in use or free
        self._bytes = 0
        self._lock = threading.Lock()
        self.reused = 0  # buffers served from a free block (counted for tests and stats)
        self.created = 0  # new blocks made for the pool

    def take(self, nbytes: int) -> np.ndarray:
        """A buffer of exactly ``nbytes`` (contents undefined)."""
        if nbytes < MIN_POOLED or nbytes > self.limit:
            return np.empty(nbytes, dtype=np.uint8)
        with self._lock:
            for block, refs in zip(self._blocks, _refcounts(self._blocks), strict=True):
                if block.nbytes == nbytes and refs <= _FREE_REFS:
                    self.reused += 1
                    return block
            if self._bytes + nbytes > self.limit:
                self._drop_free(self._bytes + nbytes - self.limit)
            if self._bytes + nbytes > self.limit:
                return np.empty(nbytes, dtype=np.uint8)
            block = np.empty(nbytes, dtype=np.uint8)
            self._blocks.append(block)
            self._bytes += nbytes
            self.created += 1
            return block

    def pooled_bytes(self) -> int:
        """Bytes of blocks the pool holds, in use or free."""
        with self._lock:
            return self._bytes

    def free_bytes(self) -> int:
        """Bytes of blocks nothing uses: memory held for the next puts."""
        with self._lock:
            refs = _refcounts(self._blocks)
            return sum(b.nbytes for b, r in zip(self._blocks, refs, strict=True) if r <= _FREE_REFS)

    def release_free(self, nbytes: int) -> None:
        """Give back at least ``nbytes`` of free blocks (or all of them) to the OS.

        The store calls this when its byte budget needs the room: idle
        buffers count against ``--capacity`` (Store.keep_spare_within_budget).
        """
        with self._lock:
            self._drop_free(nbytes)

    def _drop_free(self, need: int) -> None:
        """Release free blocks, oldest first, until ``need`` bytes are released."""
        keep: list[np.ndarray] = []
        for block, refs in zip(self._blocks, _refcounts(self._blocks), strict=True):
            if need > 0 and refs <= _FREE_REFS:
                need -= block.nbytes
                self._bytes -= block.nbytes
                continue
            keep.append(block)
        self._blocks = keep
