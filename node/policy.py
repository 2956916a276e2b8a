"""Eviction policies: plain single-threaded structures that rank keys.

The store tells a policy what happened to a key (inserted, accessed,
removed) and asks it which key to evict next. All operations are O(1).
Locks, byte accounting and statistics live in the store, not here.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Protocol


class EvictionPolicy(Protocol):
    name: str

    def inserted(self, key: Hashable) -> None: ...
    def accessed(self, key: Hashable) -> None: ...
    def removed(self, key: Hashable) -> None: ...
    def victim(self) -> Hashable | None:
        """The key to evict next, or None when the policy tracks no key."""
        ...


class LRUPolicy:
    """Least recently used: every access moves a key to the young end."""

    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[Hashable, None] = OrderedDict()

    def inserted(self, key: Hashable) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def accessed(self, key: Hashable) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def removed(self, key: Hashable) -> None:
        self._order.pop(key, None)

    def victim(self) -> Hashable | None:
        return next(iter(self._order), None)


class FIFOPolicy(LRUPolicy):
    """First in, first out: accesses do not change the order; a replace re-inserts."""

    name = "fifo"

    def accessed(self, key: Hashable) -> None:
        return None


class LFUPolicy:
    """Least frequently used, ties broken by least recent (O(1) frequency buckets).

    A replaced value starts again at frequency 1: its popularity was earned by
    bytes that no longer exist.
    """

    name = "lfu"

    def __init__(self) -> None:
        self._freq: dict[Hashable, int] = {}
        self._buckets: dict[int, OrderedDict[Hashable, None]] = {}
        self._min = 0

    def _unlink(self, key: Hashable, freq: int) -> None:
        bucket = self._buckets[freq]
        del bucket[key]
        if not bucket:
            del self._buckets[freq]
            if self._min == freq:
                self._min = freq + 1

    def inserted(self, key: Hashable) -> None:
        if key in self._freq:
            self._unlink(key, self._freq[key])
        self._freq[key] = 1
        self._buckets.setdefault(1, OrderedDict())[key] = None
        self._min = 1

    def accessed(self, key: Hashable) -> None:
        freq = self._freq.get(key)
        if freq is None:
            return
        self._unlink(key, freq)
        self._freq[key] = freq + 1
        self._buckets.setdefault(freq + 1, OrderedDict())[key] = None

    def removed(self, key: Hashable) -> None:
        freq = self._freq.pop(key, None)
        if freq is None:
            return
        self._unlink(key, freq)
        if not self._freq:
            self._min = 0
        elif self._min not in self._buckets:
            self._min = min(self._buckets)

    def victim(self) -> Hashable | None:
        if not self._freq:
            return None
        if self._min not in self._buckets:  # after a removal emptied the lowest bucket
            self._min = min(self._buckets)
        return next(iter(self._buckets[self._min]))


POLICIES: dict[str, type[LRUPolicy] | type[LFUPolicy]] = {
    "lru": LRUPolicy,
    "lfu": LFUPolicy,
    "fifo": FIFOPolicy,
}


def make_policy(name: str) -> EvictionPolicy:
    """Build a policy by name: ``lru`` (default), ``lfu`` or ``fifo``."""
    try:
        return POLICIES[name.lower()]()
    except KeyError:
        raise ValueError(
            f"unknown eviction policy {name!r}; choose one of {sorted(POLICIES)}"
        ) from None
