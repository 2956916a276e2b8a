"""A tiny transformer for the weights tests and the demo's checks (torch, CPU)."""

from __future__ import annotations

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(x)


class Tiny(nn.Module):
    def __init__(self, layers: int = 4, dim: int = 32, vocab: int = 100) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Block(dim) for _ in range(layers))
        self.head = nn.Linear(dim, vocab, bias=False)
        # A bfloat16 buffer: the dtype weights mostly come in, with no numpy form.
        self.register_buffer("scale", torch.linspace(0.5, 1.5, dim).to(torch.bfloat16))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) * self.scale.float()
        for block in self.layers:
            x = block(x)
        return self.head(x)


def model(seed: int, layers: int = 4) -> Tiny:
    torch.manual_seed(seed)
    return Tiny(layers).eval()


def tokens() -> torch.Tensor:
    return torch.arange(24).reshape(2, 12) % 100
