"""Between per-layer K/V tensors and stored chunks (torch).

A chunk is one contiguous tensor of ``layout.chunk_shape`` (layers, K/V,
heads, tokens, head dim) in the layout's dtype, put and read as a torch
tensor by the client (client/torchio.py: bfloat16 and float8 travel as
their own logical dtype). A reader checks it against the layout before
using a byte of it: a stored value of another shape or dtype is a miss,
never garbage.

Per-layer tensors are ``(heads, tokens, head_dim)``, or ``(1, heads, tokens,
head_dim)`` (a batch of one, as transformers' caches hold them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from tensorcache.errors import InvalidArgument
from tensorcache.kv.layout import KVLayout

Pair = tuple[torch.Tensor, torch.Tensor]


def torch_dtype(layout: KVLayout) -> torch.dtype:
    dtype = getattr(torch, layout.dtype)
    assert isinstance(dtype, torch.dtype)
    return dtype


def heads_view(t: object, layout: KVLayout, where: str) -> torch.Tensor:
    """``t`` as (heads, tokens, head_dim), checked against the layout (a view, no copy)."""
    if not isinstance(t, torch.Tensor):
        raise InvalidArgument(f"{where} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() == 4 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 3:
        raise InvalidArgument(
            f"{where} must be (heads, tokens, head_dim) or (1, heads, tokens, head_dim), "
            f"got shape {tuple(t.shape)}"
        )
    if t.dtype != torch_dtype(layout):
        raise InvalidArgument(f"{where} has dtype {t.dtype}, the layout says {layout.dtype}")
    if t.shape[0] != layout.num_kv_heads or t.shape[2] != layout.head_dim:
        raise InvalidArgument(
            f"{where} has shape {tuple(t.shape)}: the layout says "
            f"({layout.num_kv_heads}, tokens, {layout.head_dim})"
        )
    return t


def check_layers(
    per_layer_kv: Sequence[Any], layout: KVLayout, tokens: int, name: str
) -> list[Pair]:
    """``per_layer_kv`` as checked (K, V) views holding at least ``tokens`` tokens."""
    if isinstance(per_layer_kv, torch.Tensor) or not isinstance(per_layer_kv, Sequence):
        raise InvalidArgument(f"{name} must be a sequence of (key, value) pairs, one per layer")
    if len(per_layer_kv) != layout.num_layers:
        raise InvalidArgument(
            f"{name} has {len(per_layer_kv)} layers, the layout says {layout.num_layers}"
        )
    out: list[Pair] = []
    for i, pair in enumerate(per_layer_kv):
        if not isinstance(pair, Sequence) or len(pair) != 2:
            raise InvalidArgument(f"{name}[{i}] must be a (key, value) pair")
        k = heads_view(pair[0], layout, f"{name}[{i}][0]")
        v = heads_view(pair[1], layout, f"{name}[{i}][1]")
        for which, t in ((0, k), (1, v)):
            if t.shape[1] < tokens:
                raise InvalidArgument(
                    f"{name}[{i}][{which}] holds {t.shape[1]} tokens, fewer than {tokens}"
                )
        out.append((k, v))
    return out


def pack(layers: Sequence[Pair], start: int, layout: KVLayout) -> torch.Tensor:
    """Tokens ``start .. start + chunk_tokens`` of every layer as one contiguous chunk."""
    end = start + layout.chunk_tokens
    chunk = torch.empty(layout.chunk_shape, dtype=torch_dtype(layout), device=layers[0][0].device)
    for i, (k, v) in enumerate(layers):
        chunk[i, 0].copy_(k[:, start:end])
        chunk[i, 1].copy_(v[:, start:end])
    return chunk


def from_stored(value: object, layout: KVLayout) -> torch.Tensor | None:
    """A stored chunk (as ``get_many(..., as_="torch")`` returns it) if it has the
    layout's dtype and shape; None if not (a miss, never garbage)."""
    if (
        not isinstance(value, torch.Tensor)
        or value.dtype != torch_dtype(layout)
        or tuple(value.shape) != layout.chunk_shape
    ):
        return None
    return value


def destinations(
    out: Sequence[Any] | None, layout: KVLayout, tokens: int, device: torch.device
) -> list[Pair]:
    """Where ``tokens`` tokens of every layer go: the caller's buffers, or new ones."""
    if out is not None:
        return check_layers(out, layout, tokens, "out")
    shape = (layout.num_kv_heads, tokens, layout.head_dim)
    dtype = torch_dtype(layout)
    return [
        (
            torch.empty(shape, dtype=dtype, device=device),
            torch.empty(shape, dtype=dtype, device=device),
        )
        for _ in range(layout.num_layers)
    ]


def unpack(chunk: torch.Tensor, dests: Sequence[Pair], start: int, count: int) -> None:
    """Copy the first ``count`` tokens of ``chunk`` to tokens ``start..`` of every layer."""
    for i, (k, v) in enumerate(dests):
        k[:, start : start + count].copy_(chunk[i, 0, :, :count])
        v[:, start : start + count].copy_(chunk[i, 1, :, :count])
