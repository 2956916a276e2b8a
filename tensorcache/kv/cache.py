"""``KVCache``: prefix KV-cache chunks of one layout, shared through the cluster.

``client.kv(layout)`` returns one. Every chunk of ``layout.chunk_tokens``
tokens is one entry under a chained key (tensorcache/kv/chain.py) in the
layout's namespace (tensorcache/kv/layout.py):

* ``put_prefix`` asks which chunks are stored (one batched head per node),
  then puts the missing ones with ``if_version=0``: the first writer wins,
  a concurrent writer of the same chunk gets ``VersionConflict`` from the
  owner node, which here just means "already there" (the bytes are the same
  by construction: same layout, same tokens before it).
* ``match`` is one batched head per node over all chunk keys; the longest
  run of stored chunks from the start is the answer (a missing middle chunk
  is a gap: KV after it cannot be used without it).
* ``get_prefix`` reads chunks in batches (``get_many``: one RPC per node and
  batch) and copies them into per-layer tensors, the caller's when given.
* ``invalidate`` drops the layout's namespace (or the model's, every
  revision and layout) with the cluster's O(1) prefix invalidation.

A full store is not an error for a cache of recomputable data: nodes evict
(LRU by default; ``stats().evictions`` counts it) to make room, and a chunk
that cannot be stored at all (larger than a node, or room held by puts in
flight) is reported in the ``PutReport`` and logged, never raised. A chunk
evicted between ``match`` and ``get_prefix`` shortens the prefix returned
(``KVPrefix.tokens``), it does not fail. Other errors (an unreachable
cluster, bad arguments) propagate.

This module sits below the client (the client's ``kv()`` imports it): it
reaches the cluster only through ``KVStore``, the few methods it needs.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

from tensorcache.errors import CapacityExceeded, InvalidArgument, VersionConflict
from tensorcache.kv import tensors
from tensorcache.kv.chain import chunk_keys, token_array
from tensorcache.kv.layout import KVLayout

log = logging.getLogger("tensorcache.kv")

#: Chunk puts in flight at once per put_prefix (each holds a packed copy).
PUT_PARALLELISM = 4

#: Bytes of chunks read per get_many batch: bounds the memory held in flight.
READ_BATCH_BYTES = 256 * 1024 * 1024


class KVStore(Protocol):
    """What the KV API needs of a client (``tensorcache.Client`` has it)."""

    def put(self, key: str, value: Any, *, if_version: int | None = None) -> int: ...

    def versions(self, keys: Iterable[str]) -> dict[str, int | None]: ...

    def get_many(
        self, keys: Iterable[str], *, device: Any = None, as_: str | None = None
    ) -> Mapping[str, Any]: ...

    def invalidate(self, prefix: str, *, timeout_s: float | None = None) -> int: ...


@dataclass(frozen=True)
class PutReport:
    """What ``put_prefix`` did with each full chunk of the tokens."""

    chunks: int  # full chunks in the tokens given
    stored: int  # written by this call
    present: int  # already stored (by anyone, incl. a concurrent writer that won)
    dropped: int  # not stored: no room (see ``reason``); 0 normally
    reason: str = ""  # why chunks were dropped, from the node

    @property
    def cached_chunks(self) -> int:
        """Chunks from the start that are in the cluster now (until evicted)."""
        return self.stored + self.present


@dataclass(frozen=True)
class KVPrefix:
    """Per-layer K/V of the first ``tokens`` tokens: ``layers[i] = (k, v)``, each
    ``(num_kv_heads, tokens, head_dim)``."""

    tokens: int
    layers: list[tuple[torch.Tensor, torch.Tensor]]


class KVCache:
    """The KV-cache API for one layout over a cluster (see the module doc)."""

    def __init__(self, store: KVStore, layout: KVLayout) -> None:
        if not isinstance(layout, KVLayout):
            raise InvalidArgument(f"layout must be a KVLayout, got {type(layout).__name__}")
        self.layout = layout
        self._store = store
        self._lock = threading.Lock()
        self._metrics: Counter[str] = Counter()

    def metrics(self) -> dict[str, int]:
        """Counters: chunks stored/present/dropped, tokens matched and read, short reads."""
        with self._lock:
            return dict(self._metrics)

    def _count(self, **counts: int) -> None:
        with self._lock:
            self._metrics.update(counts)

    def keys(self, tokens: object) -> list[str]:
        """The key of every full chunk of ``tokens`` (pure; no I/O)."""
        return chunk_keys(self.layout, tokens)

    # ------------------------------------------------------------ writes
    def put_prefix(self, tokens: object, per_layer_kv: Sequence[Any]) -> PutReport:
        """Store the KV of every full chunk of ``tokens`` not stored yet.

        ``per_layer_kv[i] = (k, v)``: layer ``i``'s keys and values for (at
        least) the full chunks of ``tokens``, each ``(heads, tokens, head_dim)``
        or ``(1, heads, tokens, head_dim)``, of the layout's dtype, on any
        device. A trailing partial chunk is not stored.
        """
        keys = self.keys(tokens)
        layers = tensors.check_layers(
            per_layer_kv, self.layout, len(keys) * self.layout.chunk_tokens, "per_layer_kv"
        )
        have = self._store.versions(keys) if keys else {}
        missing = [i for i, key in enumerate(keys) if have[key] is None]
        present = len(keys) - len(missing)
        stored = dropped = 0
        reason = ""
        stop = threading.Event()

        def put_one(i: int) -> str:
            """Pack chunk ``i`` and put it if absent: "stored", "present" or "dropped"."""
            if stop.is_set():
                return "dropped"
            chunk = tensors.pack(layers, i * self.layout.chunk_tokens, self.layout)
            try:
                self._store.put(keys[i], chunk, if_version=0)
                return "stored"
            except VersionConflict:
                return "present"  # a concurrent writer stored it first: the same bytes
            except CapacityExceeded as exc:
                # No room even after eviction: chunks after a gap are unreachable
                # until it is filled, so start no more of them.
                stop.set()
                nonlocal reason
                reason = reason or str(exc)
                return "dropped"

        # Chunks go to their owners in parallel (a few at a time: each one
        # packed is a copy of its bytes), each put conditional on its own.
        with ThreadPoolExecutor(min(PUT_PARALLELISM, max(1, len(missing)))) as pool:
            for outcome in pool.map(put_one, missing):
                if outcome == "stored":
                    stored += 1
                elif outcome == "present":
                    present += 1
                else:
                    dropped += 1
        if dropped:
            log.warning(
                "kv put_prefix: %d of %d chunks not stored for lack of room: %s",
                dropped,
                len(keys),
                reason,
            )
        self._count(chunks_stored=stored, chunks_present=present, chunks_dropped=dropped)
        return PutReport(len(keys), stored, present, dropped, reason)

    # ------------------------------------------------------------ reads
    def match(self, tokens: object) -> int:
        """Tokens of ``tokens`` whose KV the cluster holds, from the start (a
        multiple of ``chunk_tokens``): one batched head per node, no bytes move."""
        keys = self.keys(tokens)
        found = 0
        if keys:
            have = self._store.versions(keys)
            while found < len(keys) and have[keys[found]] is not None:
                found += 1
        n = found * self.layout.chunk_tokens
        self._count(matches=1, tokens_matched=n)
        return n

    def get_prefix(
        self,
        tokens: object,
        n: int | None = None,
        *,
        device: str | torch.device | None = None,
        out: Sequence[Any] | None = None,
    ) -> KVPrefix:
        """Per-layer K/V of the first ``n`` tokens (default: all that is stored).

        Returns a ``KVPrefix`` whose ``tokens`` may be less than ``n`` when a
        chunk is missing (never stored, or evicted since ``match``): use what
        it holds and compute the rest. ``device``: where new tensors go
        (default CPU). ``out``: per-layer ``(k, v)`` buffers to fill instead,
        of at least ``n`` tokens (on any device); the result's tensors are
        views of them.
        """
        c = self.layout.chunk_tokens
        arr = token_array(tokens)
        limit = len(arr) // c * c
        if n is None:
            n = limit
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise InvalidArgument(f"n must be an int >= 0, got {n!r}")
        if n > limit:
            raise InvalidArgument(
                f"n={n} is beyond the last full chunk of the tokens given ({limit} tokens)"
            )
        if out is not None and device is not None:
            raise InvalidArgument("give device= or out=, not both (out's device is used)")
        dev = torch.device(device) if device is not None else torch.device("cpu")
        keys = chunk_keys(self.layout, arr, limit=math.ceil(n / c))
        dests = tensors.destinations(out, self.layout, n, dev)
        target = dests[0][0].device
        got = 0
        per_batch = max(1, READ_BATCH_BYTES // self.layout.chunk_nbytes)
        for b in range(0, len(keys), per_batch):
            batch = keys[b : b + per_batch]
            # Straight to the destination's device (CUDA: through the client's
            # staging ring), then sliced into the per-layer tensors there.
            values = self._store.get_many(batch, device=target, as_="torch")
            for key in batch:
                chunk = tensors.from_stored(values.get(key), self.layout)
                if chunk is None:
                    break
                count = min(c, n - got)
                tensors.unpack(chunk, dests, got, count)
                got += count
            if got < min(n, (b + len(batch)) * c):
                break  # a gap: what follows cannot be used
        if got < n:
            log.info("kv get_prefix: %d of %d tokens found (a chunk is missing)", got, n)
            self._count(short_reads=1)
        self._count(tokens_read=got)
        return KVPrefix(got, [(k[:, :got], v[:, :got]) for k, v in dests])

    # ------------------------------------------------------------ invalidation
    def invalidate(self, scope: Literal["layout", "model"] = "layout") -> int:
        """Drop every chunk of this layout (``"model"``: of every revision and
        layout of this model id). Once it returns no worker anywhere reads a
        chunk stored before it, near-caches included (``Client.invalidate``).
        Returns the invalidation's generation."""
        if scope == "layout":
            prefix = self.layout.prefix()
        elif scope == "model":
            prefix = self.layout.model_prefix()
        else:
            raise InvalidArgument(f"scope must be 'layout' or 'model', got {scope!r}")
        generation = self._store.invalidate(prefix)
        self._count(invalidations=1)
        return generation
