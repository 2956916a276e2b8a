"""LLM KV-cache sharing: prefix chunks of one model layout, shared through the cluster.

    from tensorcache.kv import KVLayout
    kv = client.kv(KVLayout("my-org/model", "3f2a9c1", num_layers=32,
                            num_kv_heads=8, head_dim=128, dtype="bfloat16"))
    kv.put_prefix(tokens, per_layer_kv)       # one entry per chunk, first writer wins
    n = kv.match(tokens)                      # tokens stored from the start
    prefix = kv.get_prefix(tokens, n, device="cuda")
    kv.invalidate()                           # weights changed: drop the layout

Keys: tensorcache/kv/chain.py; layout: tensorcache/kv/layout.py; the API:
tensorcache/kv/cache.py; transformers helpers: tensorcache/kv/hf.py.
The data API needs torch (the ``kv`` extra); the layout and the keys do not,
so a process that only computes keys (a router, a scheduler) imports them
without torch: the torch-facing names load on first use.
docs/kv-cache.md explains the design.
"""

from typing import TYPE_CHECKING, Any

from tensorcache.kv.chain import chunk_digests, chunk_keys
from tensorcache.kv.layout import KVLayout

if TYPE_CHECKING:
    from tensorcache.kv.cache import KVCache, KVPrefix, KVStore, PutReport

_LAZY = {"KVCache", "KVPrefix", "KVStore", "PutReport"}

__all__ = [
    "KVCache",
    "KVLayout",
    "KVPrefix",
    "KVStore",
    "PutReport",
    "chunk_digests",
    "chunk_keys",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from tensorcache.kv import cache

        return getattr(cache, name)
    raise AttributeError(f"module 'tensorcache.kv' has no attribute {name!r}")
