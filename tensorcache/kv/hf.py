"""transformers integration: between a ``DynamicCache`` and the KV-cache API.

    from tensorcache.kv import hf
    layout = hf.layout_for(model, model_id="org/model", revision="3f2a9c1")
    kv = client.kv(layout)
    step = hf.prefill(model, kv, input_ids)  # reuses the cluster's prefix, stores the rest
    step.logits, step.cache, step.reused     # continue decoding from step.cache

The pitfalls it handles, each of which silently gives wrong logits when missed:

* **Attention mask over prefix + suffix.** The suffix's tokens attend to the
  cached prefix too: the mask covers all ``n + m`` positions, not the ``m``
  tokens fed in.
* **Position ids continue after the prefix.** The suffix starts at position
  ``n``, not 0 (rotary embeddings would otherwise encode the wrong offsets).
* **A fresh cache per continuation.** A ``DynamicCache`` grows in place as
  the model runs, so reusing one for two continuations feeds the second the
  first one's tokens. ``dynamic_cache`` builds a new one from the stored
  tensors every time.
* **At least one token is computed.** The logits of the last prompt token are
  needed to sample; if the whole prompt is cached, the last chunk is
  recomputed rather than returned without logits.

Batches of one sequence (``input_ids`` of shape ``(1, n)``); pinned to the
transformers version of the ``kv`` extra (its ``cache=`` forward argument).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache, PretrainedConfig, PreTrainedModel

from tensorcache.errors import InvalidArgument
from tensorcache.kv.cache import KVCache, PutReport
from tensorcache.kv.layout import KVLayout
from tensorcache.kv.tensors import Pair

__all__ = [
    "Prefill",
    "cache_layers",
    "continue_from",
    "dynamic_cache",
    "generate",
    "layout_for",
    "prefill",
]


def layout_for(
    model: PreTrainedModel | PretrainedConfig,
    *,
    model_id: str,
    revision: str,
    dtype: torch.dtype | None = None,
    chunk_tokens: int = 256,
    tp_rank: int = 0,
    tp_size: int = 1,
    extra: tuple[tuple[str, str], ...] = (),
) -> KVLayout:
    """The layout of a transformers model's KV cache (its config gives the shapes).

    ``model_id`` and ``revision`` are required: a config does not know which
    weights were loaded, and two checkpoints of one architecture must not
    share KV. ``dtype``: the KV dtype (default: the model's).
    """
    config: Any = model.config if isinstance(model, PreTrainedModel) else model
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if dtype is None:
        dtype = model.dtype if isinstance(model, PreTrainedModel) else torch.float32
    name = str(dtype).removeprefix("torch.")
    if kv_heads % tp_size:
        raise InvalidArgument(f"{kv_heads} KV heads cannot be split over tp_size={tp_size}")
    return KVLayout(
        model_id,
        revision,
        num_layers=config.num_hidden_layers,
        num_kv_heads=kv_heads // tp_size,
        head_dim=head_dim,
        dtype=name,
        chunk_tokens=chunk_tokens,
        tp_rank=tp_rank,
        tp_size=tp_size,
        extra=extra,
    )


def cache_layers(cache: DynamicCache) -> list[Pair]:
    """Per-layer (K, V) of a ``DynamicCache``, each ``(batch, heads, tokens, head_dim)`` (views)."""
    out: list[Pair] = []
    for i, layer in enumerate(cache.layers):
        k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not isinstance(k, torch.Tensor) or not isinstance(v, torch.Tensor):
            raise InvalidArgument(f"cache layer {i} holds no key/value tensors")
        out.append((k, v))
    return out


def dynamic_cache(layers: Sequence[Pair], config: PretrainedConfig) -> DynamicCache:
    """A new ``DynamicCache`` holding ``layers`` (``(heads, tokens, head_dim)`` or with a
    batch dim of one). New each call: a cache grows in place as the model runs."""
    cache = DynamicCache(config=config)
    for i, (k, v) in enumerate(layers):
        if k.dim() == 3:
            k, v = k.unsqueeze(0), v.unsqueeze(0)
        cache.update(k, v, i)
    return cache


def _ids(input_ids: Any) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.long, torch.int):
        raise InvalidArgument("input_ids must be an integer torch.Tensor")
    ids = input_ids.unsqueeze(0) if input_ids.dim() == 1 else input_ids
    if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
        raise InvalidArgument(
            f"input_ids must be (1, tokens) with tokens >= 1, got {tuple(input_ids.shape)}"
        )
    return ids


def continue_from(
    model: PreTrainedModel, layers: Sequence[Pair], n: int, input_ids: torch.Tensor
) -> Any:
    """Run ``model`` over ``input_ids[:, n:]`` after the KV of its first ``n`` tokens.

    ``layers`` holds that KV (from the cluster or computed here, alike). The
    mask spans all ``len(input_ids)`` positions, position ids start at ``n``,
    and the cache is a fresh one. Returns the model's output (``logits`` of
    the ``len - n`` tokens, ``cache`` of all of them).
    """
    ids = _ids(input_ids)
    total = ids.shape[1]
    if not 0 <= n < total:
        raise InvalidArgument(f"n must be in [0, {total}), got {n}")
    cache = dynamic_cache(layers, model.config) if n else DynamicCache(config=model.config)
    device = ids.device
    with torch.no_grad():
        return model(
            ids[:, n:],
            attention_mask=torch.ones(1, total, dtype=torch.long, device=device),
            position_ids=torch.arange(n, total, device=device).unsqueeze(0),
            cache=cache,
            use_cache=True,
        )


@dataclass(frozen=True)
class Prefill:
    """The result of ``prefill``: logits of the computed tokens, the full cache, how
    many prompt tokens came from the cluster, and what storing did."""

    logits: torch.Tensor
    cache: DynamicCache
    reused: int
    stored: PutReport | None


def _cluster_prefix(
    model: PreTrainedModel, kv: KVCache, ids: torch.Tensor
) -> tuple[int, list[Pair]]:
    """The longest stored prefix of ``ids`` leaving a token to compute, on the model's device."""
    c = kv.layout.chunk_tokens
    usable = (ids.shape[1] - 1) // c * c  # leave one token to compute: its logits are needed
    n = kv.match(ids[0, :usable]) if usable else 0
    if not n:
        return 0, []
    got = kv.get_prefix(ids[0], n, device=model.device)
    return got.tokens, got.layers  # shorter if a chunk went since match


def prefill(
    model: PreTrainedModel, kv: KVCache, input_ids: torch.Tensor, *, store: bool = True
) -> Prefill:
    """Prefill a prompt, reusing the longest prefix the cluster holds.

    Asks the cluster for the prompt's longest stored prefix (one batched
    head per node), loads it onto the model's device, computes the rest,
    and (``store``) puts the prompt's new full chunks for other workers.
    """
    ids = _ids(input_ids)
    n, layers = _cluster_prefix(model, kv, ids)
    out = continue_from(model, layers, n, ids)
    report = kv.put_prefix(ids[0], cache_layers(out.cache)) if store else None
    return Prefill(out.logits, out.cache, n, report)


def generate(
    model: PreTrainedModel,
    kv: KVCache,
    input_ids: torch.Tensor,
    *,
    store: bool = True,
    **generate_kwargs: Any,
) -> Any:
    """``model.generate`` starting from the longest prefix the cluster holds.

    The cache handed to ``generate`` is a fresh one holding that prefix;
    ``generate`` computes the rest of the prompt and decodes. With ``store``
    the prompt's full chunks not stored yet are put afterwards (generated
    tokens are not: their KV is the next request's prompt, stored then).
    """
    ids = _ids(input_ids)
    n, layers = _cluster_prefix(model, kv, ids)
    cache = dynamic_cache(layers, model.config) if n else DynamicCache(config=model.config)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            cache=cache,
            **generate_kwargs,
        )
    if store:
        kv.put_prefix(ids[0], cache_layers(cache))
    return out
