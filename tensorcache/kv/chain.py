"""Chained chunk digests: the key of every chunk of a token sequence.

A sequence is cut into chunks of ``layout.chunk_tokens`` tokens; only full
chunks get keys (a partial tail is recomputed, as vLLM and LMCache do: its KV
would change as tokens are appended). Chunk ``i``'s digest is

    d[-1] = BLAKE2b-256(SCHEME || 0x00 || layout.canonical())
    d[i]  = BLAKE2b-256(d[i-1] || tokens[i*C:(i+1)*C] as little-endian uint64)

so a chunk's digest names its tokens *and every token before it* (KV of a
token depends on the whole prefix) and the layout. Token ids are written as
fixed-width unsigned 64-bit little-endian integers: the same bytes on every
machine, whatever the id's size, with no separator needed. Nothing here
depends on ``hash()``, ``PYTHONHASHSEED``, the process or the platform; the
golden-vector test (tests/unit/test_kv_chain.py) pins the output.

The key of chunk ``i`` is ``layout.prefix() + d[i].hex()``.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from tensorcache.errors import InvalidArgument
from tensorcache.kv.layout import SCHEME, KVLayout

DIGEST_SIZE = 32


def token_array(tokens: object) -> np.ndarray:
    """``tokens`` (a sequence of ints, a 1-d integer numpy array or torch tensor,
    or a ``(1, n)`` batch of one) as a 1-d ``<u8`` array. Raises InvalidArgument."""
    raw: Any = tokens
    if hasattr(raw, "detach") and hasattr(raw, "cpu"):  # a torch tensor, any device
        raw = raw.detach().cpu().numpy()
    if isinstance(raw, str | bytes):
        raise InvalidArgument(f"tokens must be a sequence of ints, got {type(tokens).__name__}")
    try:
        arr = np.asarray(raw)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"tokens must be a sequence of ints: {exc}") from exc
    if arr.ndim == 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 1:
        raise InvalidArgument(f"tokens must be 1-d (or a batch of one), got shape {arr.shape}")
    if arr.size == 0:
        return np.empty(0, "<u8")
    if arr.dtype.kind not in "iu":
        raise InvalidArgument(f"tokens must be integers, got dtype {arr.dtype}")
    if arr.dtype.kind == "i" and int(arr.min()) < 0:
        raise InvalidArgument(f"tokens must be >= 0, got {int(arr.min())}")
    return arr.astype("<u8", copy=False)


def root_digest(layout: KVLayout) -> bytes:
    return hashlib.blake2b(
        SCHEME.encode() + b"\x00" + layout.canonical(), digest_size=DIGEST_SIZE
    ).digest()


def chunk_digests(layout: KVLayout, tokens: object, *, limit: int | None = None) -> list[bytes]:
    """The digest of every full chunk of ``tokens`` (at most ``limit`` chunks)."""
    arr = token_array(tokens)
    c = layout.chunk_tokens
    n = len(arr) // c
    if limit is not None:
        n = min(n, limit)
    out: list[bytes] = []
    prev = root_digest(layout)
    for i in range(n):
        h = hashlib.blake2b(prev, digest_size=DIGEST_SIZE)
        h.update(arr[i * c : (i + 1) * c].tobytes())
        prev = h.digest()
        out.append(prev)
    return out


def chunk_keys(layout: KVLayout, tokens: object, *, limit: int | None = None) -> list[str]:
    """The cache key of every full chunk of ``tokens`` (see the module doc)."""
    prefix = layout.prefix()
    return [prefix + d.hex() for d in chunk_digests(layout, tokens, limit=limit)]
