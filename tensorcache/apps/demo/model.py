"""The demo's model on disk: a transformer-shaped set of tensors, one ``.npy`` each.

Generated once with a seeded RNG into ``<dir>/model-<size>mib/`` with a
``manifest.json`` holding every tensor's dtype, shape and CRC32C; written
into a temporary directory and renamed, and reused while the manifest
matches. The manifest's checksums are what every worker verifies against.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tensorcache import codec

MiB = 1024 * 1024
GiB = 1024 * MiB
FORMAT = 1
SEED = 0


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the model: its name, file, layout and checksum."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    crc32c: int = 0
    file_bytes: int = 0

    @property
    def file(self) -> str:
        return f"{self.name}.npy"


@dataclass(frozen=True)
class Model:
    """A model on disk: its directory and tensors, in load order."""

    path: Path
    revision: str
    tensors: tuple[TensorSpec, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def groups(self) -> Iterator[list[TensorSpec]]:
        """Tensors in the units a loader fetches together: one layer, or one top-level tensor."""
        group: list[TensorSpec] = []
        for t in self.tensors:
            if group and _unit(t.name) != _unit(group[0].name):
                yield group
                group = []
            group.append(t)
        if group:
            yield group

    def key(self, t: TensorSpec) -> str:
        # Deterministic across processes: the revision hashes the content.
        return f"demo/{self.revision}/{t.name}"


def _unit(name: str) -> str:
    return ".".join(name.split(".")[:2]) if name.startswith("layers.") else name


def model_layout(model_mib: int) -> list[TensorSpec]:
    """A llama-shaped set of tensors of about ``model_mib`` MiB (no checksums yet)."""
    if model_mib < 1:
        raise ValueError(f"model size must be >= 1 MiB, got {model_mib}")
    d = 1024 if model_mib >= 128 else 512 if model_mib >= 32 else 256
    vocab = 8 * d
    ffn = 256 * math.ceil(8 * d / 3 / 256)
    f16, f32 = np.dtype(np.float16), np.dtype(np.float32)

    def spec(name: str, shape: tuple[int, ...], dtype: np.dtype) -> TensorSpec:
        return TensorSpec(name, shape, dtype.str, math.prod(shape) * dtype.itemsize)

    head = [spec("embed_tokens", (vocab, d), f32)]
    tail = [spec("norm", (d,), f32), spec("lm_head", (vocab, d), f16)]

    def layer(i: int) -> list[TensorSpec]:
        p = f"layers.{i:02d}"
        return [
            spec(f"{p}.input_layernorm", (d,), f32),
            *(spec(f"{p}.attn.{m}_proj", (d, d), f16) for m in "qkvo"),
            spec(f"{p}.post_attention_layernorm", (d,), f32),
            spec(f"{p}.mlp.gate_proj", (ffn, d), f16),
            spec(f"{p}.mlp.up_proj", (ffn, d), f16),
            spec(f"{p}.mlp.down_proj", (d, ffn), f16),
        ]

    fixed = sum(t.nbytes for t in head + tail)
    per_layer = sum(t.nbytes for t in layer(0))
    n_layers = max(1, round((model_mib * MiB - fixed) / per_layer))
    return head + [t for i in range(n_layers) for t in layer(i)] + tail


def _generate(spec: TensorSpec, rng: np.random.Generator) -> np.ndarray:
    if len(spec.shape) == 1:  # a norm's scale: around 1
        return (1.0 + 0.1 * rng.standard_normal(spec.shape, dtype=np.float32)).astype(spec.dtype)
    scale = np.float32(1.0 / math.sqrt(spec.shape[-1]))
    return (rng.standard_normal(spec.shape, dtype=np.float32) * scale).astype(spec.dtype)


def _revision(tensors: list[TensorSpec]) -> str:
    text = json.dumps([[t.name, t.dtype, list(t.shape), t.crc32c] for t in tensors])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _read_manifest(path: Path, layout: list[TensorSpec]) -> Model | None:
    """The model in ``path`` if its manifest matches ``layout`` and its files are whole."""
    try:
        doc = json.loads((path / "manifest.json").read_text())
        if doc.get("format") != FORMAT or doc.get("seed") != SEED:
            return None
        tensors = [
            TensorSpec(
                t["name"], tuple(t["shape"]), t["dtype"], t["nbytes"], t["crc32c"], t["file_bytes"]
            )
            for t in doc["tensors"]
        ]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    same = [(t.name, t.shape, t.dtype, t.nbytes) for t in tensors] == [
        (t.name, t.shape, t.dtype, t.nbytes) for t in layout
    ]
    if not same or doc.get("revision") != _revision(tensors):
        return None
    for t in tensors:
        try:
            if (path / t.file).stat().st_size != t.file_bytes:
                return None
        except OSError:
            return None
    return Model(path, doc["revision"], tuple(tensors))


def ensure_model(root: Path, model_mib: int) -> tuple[Model, bool]:
    """The demo model under ``root``, written first if missing; returns (model, created)."""
    layout = model_layout(model_mib)
    path = root / f"model-{model_mib}mib"
    found = _read_manifest(path, layout)
    if found is not None:
        return found, False
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{path.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        rng = np.random.default_rng(SEED)
        tensors: list[TensorSpec] = []
        for t in layout:
            arr = _generate(t, rng)
            np.save(tmp / t.file, arr, allow_pickle=False)
            tensors.append(
                TensorSpec(
                    t.name,
                    t.shape,
                    t.dtype,
                    t.nbytes,
                    codec.crc32c(arr.reshape(-1).view(np.uint8)),
                    (tmp / t.file).stat().st_size,
                )
            )
        revision = _revision(tensors)
        doc = {
            "format": FORMAT,
            "seed": SEED,
            "revision": revision,
            "nbytes": sum(t.nbytes for t in tensors),
            "tensors": [
                {
                    "name": t.name,
                    "shape": list(t.shape),
                    "dtype": t.dtype,
                    "nbytes": t.nbytes,
                    "crc32c": t.crc32c,
                    "file_bytes": t.file_bytes,
                }
                for t in tensors
            ],
        }
        (tmp / "manifest.json").write_text(json.dumps(doc, indent=1) + "\n")
        # A stale or partial model of this size is replaced; the rename is
        # the commit point, so a reader never sees a half-written model.
        if path.exists():
            shutil.rmtree(path)
        os.rename(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Model(path, revision, tuple(tensors)), True
