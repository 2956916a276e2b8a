"""``KVLayout``: everything that decides what the bytes of a KV-cache chunk mean.

Two workers may share a chunk only if its bytes mean the same to both: the
same weights (model id *and* revision: KV computed with other weights gives
silently wrong outputs), the same layers, heads and head size, the same
dtype, the same chunking, and the same slice of the model under tensor or
pipeline parallelism (rank 0 of TP=2 holds other heads than rank 1, and
neither holds what a TP=1 worker holds). All of it goes into the layout's
digest, and the digest is part of every key (tensorcache/kv/chain.py), so a
worker with any other layout simply misses: never garbage.

``extra`` carries whatever else changes the bytes for a given engine (rope
scaling, a KV quantisation scale, an attention variant such as MLA's latent
cache): sorted ``(name, value)`` string pairs, hashed like the rest.

The digest is over a canonical JSON encoding (sorted keys, no spaces, ASCII
escapes), never over ``repr`` or ``hash()``, so every process, Python
version and machine computes the same one; ``SCHEME`` versions the whole
key derivation, so a change to it can never alias old keys.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from tensorcache.errors import InvalidArgument

#: Version of the key derivation (layout encoding + chain); part of every digest.
SCHEME = "tensorcache-kv-v1"

#: KV dtypes a layout may name, with their size in bytes (torch's names).
DTYPES: dict[str, int] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int8": 1,
    "uint8": 1,
}

#: Longest text field, so a key namespace never gets near the 1024-byte key limit.
MAX_TEXT = 256


def _text(name: str, value: object, *, empty_ok: bool = False) -> str:
    if not isinstance(value, str):
        raise InvalidArgument(f"KVLayout.{name} must be a str, got {type(value).__name__}")
    if not value and not empty_ok:
        raise InvalidArgument(f"KVLayout.{name} must not be empty")
    if len(value) > MAX_TEXT:
        raise InvalidArgument(f"KVLayout.{name} is {len(value)} characters, at most {MAX_TEXT}")
    return value


def _int(name: str, value: object, low: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidArgument(f"KVLayout.{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise InvalidArgument(f"KVLayout.{name} must be >= {low}, got {value}")
    return value


@dataclass(frozen=True)
class KVLayout:
    """What a worker's KV-cache bytes are; equal layouts share chunks, others never.

    Shapes are those *this worker* holds: ``num_layers`` layers starting at
    global layer ``first_layer`` (pipeline parallelism), ``num_kv_heads``
    heads of this tensor-parallel rank (``tp_rank`` of ``tp_size``), each of
    ``head_dim``. A chunk of ``chunk_tokens`` tokens is stored as one entry
    of shape ``(num_layers, 2, num_kv_heads, chunk_tokens, head_dim)`` (2: key,
    value) and dtype ``dtype``.

    ``revision`` must name the weights exactly (a commit hash or a version
    label that is never reused); if a label is reused for new weights, call
    ``KVCache.invalidate(scope="model")``.
    """

    model_id: str
    revision: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    chunk_tokens: int = 256
    tp_rank: int = 0
    tp_size: int = 1
    first_layer: int = 0
    extra: tuple[tuple[str, str], ...] = field(default=())

    def __post_init__(self) -> None:
        _text("model_id", self.model_id)
        _text("revision", self.revision)
        _int("num_layers", self.num_layers, 1)
        _int("num_kv_heads", self.num_kv_heads, 1)
        _int("head_dim", self.head_dim, 1)
        _int("chunk_tokens", self.chunk_tokens, 1)
        _int("tp_size", self.tp_size, 1)
        _int("tp_rank", self.tp_rank, 0)
        _int("first_layer", self.first_layer, 0)
        if self.tp_rank >= self.tp_size:
            raise InvalidArgument(
                f"KVLayout.tp_rank must be < tp_size ({self.tp_size}), got {self.tp_rank}"
            )
        if self.dtype not in DTYPES:
            raise InvalidArgument(
                f"KVLayout.dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}"
            )
        if not isinstance(self.extra, tuple):
            raise InvalidArgument(
                "KVLayout.extra must be a tuple of (str, str) pairs, "
                f"got {type(self.extra).__name__}"
            )
        names: list[str] = []
        for i, pair in enumerate(self.extra):
            if not (isinstance(pair, tuple) and len(pair) == 2):
                raise InvalidArgument(f"KVLayout.extra[{i}] must be a (name, value) pair")
            names.append(_text(f"extra[{i}][0]", pair[0]))
            _text(f"extra[{i}][1]", pair[1], empty_ok=True)
        if names != sorted(set(names)):
            raise InvalidArgument("KVLayout.extra names must be unique and sorted")

    # ------------------------------------------------------------ derived
    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype]

    @property
    def chunk_shape(self) -> tuple[int, int, int, int, int]:
        """Shape of one stored chunk: (layers, 2 (K, V), kv heads, chunk tokens, head dim)."""
        return (self.num_layers, 2, self.num_kv_heads, self.chunk_tokens, self.head_dim)

    @property
    def chunk_nbytes(self) -> int:
        n = self.itemsize
        for d in self.chunk_shape:
            n *= d
        return n

    def canonical(self) -> bytes:
        """The bytes the digest is taken over (documented in docs/kv-cache.md)."""
        doc: dict[str, Any] = {
            "scheme": SCHEME,
            "model_id": self.model_id,
            "revision": self.revision,
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "dtype": self.dtype,
            "chunk_tokens": self.chunk_tokens,
            "tp_rank": self.tp_rank,
            "tp_size": self.tp_size,
            "first_layer": self.first_layer,
            "extra": [list(p) for p in self.extra],
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()

    def digest(self) -> bytes:
        """32-byte BLAKE2b of ``canonical()``: the layout's identity."""
        return hashlib.blake2b(self.canonical(), digest_size=32).digest()

    def model_digest(self) -> bytes:
        """8-byte BLAKE2b of the scheme and model id alone: every revision's and layout's
        keys share it, so one invalidation can drop them all."""
        raw = json.dumps([SCHEME, self.model_id], ensure_ascii=True).encode()
        return hashlib.blake2b(raw, digest_size=8).digest()

    def model_prefix(self) -> str:
        """``kv/<model digest>/``: the prefix of every key of this model id."""
        return f"kv/{self.model_digest().hex()}/"

    def prefix(self) -> str:
        """``kv/<model digest>/<layout digest, 16 bytes>/``: this layout's namespace."""
        return f"{self.model_prefix()}{self.digest()[:16].hex()}/"
