"""The demo's model: a small llama-shaped transformer in torch, its checkpoint in safetensors.

Built with a seeded RNG (no download) and written once to
``<dir>/model-<size>mib/model.safetensors`` (bfloat16, as weights mostly
come), next to ``reference.json``: the model's layout, the tokens of the
demo's forward pass and the SHA-256 of its output, computed here. Every
worker's output must match that digest bit for bit. Written into a temporary
directory and renamed (the rename is the commit point), and reused while
``reference.json`` matches the size asked for.

Forward passes run on one thread (``torch.set_num_threads(1)``) in the
reference and in every worker: the same kernels in the same order, so equal
weights give equal bits.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MiB = 1024 * 1024
GiB = 1024 * MiB
FORMAT = 2
SEED = 0
TOKENS = [[(7 * i + 3) % 1000 for i in range(16)]]


@dataclass(frozen=True)
class Shape:
    dim: int
    layers: int
    vocab: int
    ffn: int
    heads: int

    @property
    def nbytes(self) -> int:  # bfloat16
        per_layer = 4 * self.dim * self.dim + 3 * self.dim * self.ffn + 2 * self.dim
        return 2 * (2 * self.vocab * self.dim + self.dim + self.layers * per_layer)


def shape_for(model_mib: int) -> Shape:
    """A llama-like shape of about ``model_mib`` MiB in bfloat16."""
    if model_mib < 1:
        raise ValueError(f"model size must be >= 1 MiB, got {model_mib}")
    d = 1024 if model_mib >= 128 else 512 if model_mib >= 32 else 256
    vocab, ffn, heads = 4 * d, 256 * math.ceil(8 * d / 3 / 256), d // 64
    base = Shape(d, 1, vocab, ffn, heads)
    per_layer = base.nbytes - Shape(d, 0, vocab, ffn, heads).nbytes
    fixed = Shape(d, 0, vocab, ffn, heads).nbytes
    layers = max(1, round((model_mib * MiB - fixed) / per_layer))
    return Shape(d, layers, vocab, ffn, heads)


def build(shape: Shape, seed: int | None = SEED) -> Any:
    """The model (torch.nn.Module, bfloat16, eval mode); random weights from ``seed``."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            d = shape.dim
            self.input_norm = nn.RMSNorm(d)
            self.q_proj, self.k_proj = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
            self.v_proj, self.o_proj = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
            self.post_norm = nn.RMSNorm(d)
            self.gate_proj = nn.Linear(d, shape.ffn, bias=False)
            self.up_proj = nn.Linear(d, shape.ffn, bias=False)
            self.down_proj = nn.Linear(shape.ffn, d, bias=False)

        def forward(self, x: Any) -> Any:
            b, n, d = x.shape
            h = self.input_norm(x)

            def heads(t: Any) -> Any:
                return t.view(b, n, shape.heads, d // shape.heads).transpose(1, 2)

            q, k, v = heads(self.q_proj(h)), heads(self.k_proj(h)), heads(self.v_proj(h))
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.o_proj(a.transpose(1, 2).reshape(b, n, d))
            h = self.post_norm(x)
            return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed_tokens = nn.Embedding(shape.vocab, shape.dim)
            self.layers = nn.ModuleList(Block() for _ in range(shape.layers))
            self.norm = nn.RMSNorm(shape.dim)
            self.lm_head = nn.Linear(shape.dim, shape.vocab, bias=False)

        def forward(self, tokens: Any) -> Any:
            x = self.embed_tokens(tokens)
            for block in self.layers:
                x = block(x)
            return self.lm_head(self.norm(x))

    if seed is not None:
        torch.manual_seed(seed)
    with torch.device("cpu"):
        m = Model()
    return m.to(torch.bfloat16).eval()


def forward_digest(model: Any) -> str:
    """SHA-256 of the model's output on the demo's tokens (one thread: reproducible bits)."""
    import torch

    torch.set_num_threads(1)
    with torch.no_grad():
        out = model(torch.tensor(TOKENS))
    return hashlib.sha256(out.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


@dataclass(frozen=True)
class ModelFiles:
    """The checkpoint on disk and what every worker checks against."""

    path: Path  # the .safetensors file
    shape: Shape
    revision: str  # the file's SHA-256 (first 12 hex): a new checkpoint, a new revision
    digest: str  # the reference output's SHA-256
    nbytes: int  # tensor bytes
    tensors: int

    @property
    def prefix(self) -> str:
        return f"demo/{self.revision}/"


def _read(path: Path, shape: Shape) -> ModelFiles | None:
    try:
        doc = json.loads((path / "reference.json").read_text())
        if doc.get("format") != FORMAT or Shape(**doc["shape"]) != shape:
            return None
        file = path / "model.safetensors"
        if file.stat().st_size != doc["file_bytes"]:
            return None
        return ModelFiles(
            file, shape, doc["revision"], doc["digest"], doc["nbytes"], doc["tensors"]
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def ensure_model(root: Path, model_mib: int) -> tuple[ModelFiles, bool]:
    """The demo checkpoint under ``root``, written first if missing; returns (files, created)."""
    from safetensors.torch import save_file

    shape = shape_for(model_mib)
    path = root / f"model-{model_mib}mib"
    found = _read(path, shape)
    if found is not None:
        return found, False
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{path.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        model = build(shape)
        sd = model.state_dict()
        file = tmp / "model.safetensors"
        save_file(sd, str(file))
        with open(file, "rb") as f:
            revision = hashlib.file_digest(f, "sha256").hexdigest()[:12]
            os.fsync(f.fileno())  # clean pages: posix_fadvise(DONTNEED) can then drop them
        doc = {
            "format": FORMAT,
            "seed": SEED,
            "shape": shape.__dict__,
            "revision": revision,
            "digest": forward_digest(model),
            "nbytes": sum(t.numel() * t.element_size() for t in sd.values()),
            "tensors": len(sd),
            "file_bytes": file.stat().st_size,
        }
        (tmp / "reference.json").write_text(json.dumps(doc, indent=1) + "\n")
        if path.exists():
            shutil.rmtree(path)
        os.rename(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    found = _read(path, shape)
    assert found is not None, "the checkpoint just written does not read back"
    return found, True
