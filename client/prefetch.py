"""Prefetch and streaming: gets that run ahead of the caller.

``prefetch(keys)`` starts one ``get_many`` in the background and returns its
``concurrent.futures.Future``; ``stream(keys, lookahead=N)`` yields
``(key, value)`` in the order given while the next N gets are already in
flight, so a consumer that works on item i (a layer's forward pass) overlaps
the transfer of items i+1..i+N.

Why a pool of its own: a public call of the client submits fan-out tasks to
the client's pool and waits on them; a background get doing that from
*inside* that pool could fill it with waiters and deadlock. These gets run
on a separate, bounded executor and only wait on the client's pool.

Bounds and failure: at most N gets are in flight per stream (N+1 with the
one being handed out); a miss is yielded as ``(key, None)`` exactly as
``get`` returns it; a get that raises re-raises, at the item that failed,
when the consumer reaches it (items before it are yielded first). A consumer
that stops early (``break``, an exception, ``close()``) cancels the gets not
yet started and waits for those running, so no transfer outlives the stream
and no ``out`` buffer is written after it ends.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

from tensorcache.errors import InvalidArgument

GetOne = Callable[[str], Any]
GetMany = Callable[[list[str]], dict[str, Any]]


class Prefetcher:
    """The background executor of one client (created on first use, closed with it)."""

    def __init__(self, workers: int) -> None:
        self._workers = max(2, workers)
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._closed = False

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._closed:
                raise InvalidArgument("the client is closed")
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="tc-prefetch")
            return self._pool

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def prefetch(self, keys: list[str], get_many: GetMany) -> Future[dict[str, Any]]:
        return self._executor().submit(get_many, keys)

    def stream(self, keys: Iterable[str], lookahead: int, get: GetOne) -> Iterator[tuple[str, Any]]:
        if isinstance(keys, str):
            raise InvalidArgument("stream takes an iterable of keys, not a single str")
        if not isinstance(lookahead, int) or isinstance(lookahead, bool) or lookahead < 0:
            raise InvalidArgument(f"lookahead must be an int >= 0, got {lookahead!r}")
        pool = self._executor()  # fail now, not at the first next()
        return _stream(iter(keys), lookahead, get, pool)


def _stream(
    keys: Iterator[str], lookahead: int, get: GetOne, pool: ThreadPoolExecutor
) -> Iterator[tuple[str, Any]]:
    inflight: deque[tuple[str, Future[Any]]] = deque()
    done = object()

    def fill(n: int) -> None:
        while len(inflight) < n:
            key = next(keys, done)
            if key is done:
                return
            if not isinstance(key, str):
                raise InvalidArgument(f"stream keys must be str, got {type(key).__name__}")
            inflight.append((key, pool.submit(get, key)))

    try:
        while True:
            fill(max(lookahead, 1))
            if not inflight:
                return
            key, fut = inflight.popleft()
            value = fut.result()  # re-raises the get's error at this item
            fill(lookahead)  # while the consumer holds item i, i+1..i+N are in flight
            yield key, value
    finally:
        # Stopped early or failed: drop what has not started, wait for the rest.
        for _, fut in inflight:
            fut.cancel()
        wait([fut for _, fut in inflight])
