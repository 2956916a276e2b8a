"""safetensors checkpoints, read tensor by tensor without loading a file whole.

The format is small enough to read ourselves, which lets a loader stream
each tensor's bytes into a buffer it reuses (peak memory: a batch buffer
plus the largest tensor, not the checkpoint) and needs neither torch nor
the ``safetensors`` package (tests write files with that package, so the
parser is checked against the reference writer):

    u64 little-endian N | N bytes of JSON header | data
    header: {"__metadata__": {str: str}, name: {"dtype": "F32",
             "shape": [..], "data_offsets": [begin, end]}, ...}

offsets are relative to the start of the data. A checkpoint is one
``.safetensors`` file, a sharded checkpoint (``model.safetensors.index.json``
with a ``weight_map`` of tensor name -> file) or a directory holding either.
Everything is validated before a byte is loaded: a bad file raises
``InvalidArgument`` naming the file, the tensor and the field.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tensorcache.errors import InvalidArgument

INDEX_NAME = "model.safetensors.index.json"
MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's limit

#: safetensors dtype -> (numpy dtype str or None, torch dtype name, itemsize).
#: bfloat16 and the float8 types have no numpy dtype: they need torch.
DTYPES: dict[str, tuple[str | None, str, int]] = {
    "F64": ("<f8", "float64", 8),
    "F32": ("<f4", "float32", 4),
    "F16": ("<f2", "float16", 2),
    "BF16": (None, "bfloat16", 2),
    "F8_E4M3": (None, "float8_e4m3fn", 1),
    "F8_E5M2": (None, "float8_e5m2", 1),
    "I64": ("<i8", "int64", 8),
    "I32": ("<i4", "int32", 4),
    "I16": ("<i2", "int16", 2),
    "I8": ("|i1", "int8", 1),
    "U64": ("<u8", "uint64", 8),
    "U32": ("<u4", "uint32", 4),
    "U16": ("<u2", "uint16", 2),
    "U8": ("|u1", "uint8", 1),
    "BOOL": ("|b1", "bool", 1),
    "C64": ("<c8", "complex64", 8),
}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes lie: ``nbytes`` from absolute offset ``start`` of ``file``."""

    name: str
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    file: Path
    start: int
    nbytes: int


@dataclass(frozen=True)
class Checkpoint:
    files: tuple[Path, ...]
    tensors: tuple[TensorInfo, ...]  # in file order, then offset order (sequential reads)
    metadata: dict[str, str]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def largest(self) -> int:
        return max((t.nbytes for t in self.tensors), default=0)


def read_header(file: Path) -> tuple[list[TensorInfo], dict[str, str]]:
    """The tensors of one ``.safetensors`` file (sorted by offset) and its metadata."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise InvalidArgument(f"{file}: not a safetensors file (shorter than 8 bytes)")
            n = int.from_bytes(head, "little")
            if n > MAX_HEADER or 8 + n > size:
                raise InvalidArgument(
                    f"{file}: not a safetensors file (header length {n}, file size {size})"
                )
            raw = f.read(n)
    except OSError as exc:
        raise InvalidArgument(f"{file}: cannot read: {exc}") from exc
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArgument(f"{file}: header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise InvalidArgument(f"{file}: header must be a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise InvalidArgument(f"{file}: __metadata__ must map str to str")
    base = 8 + n
    out = [_tensor(file, name, spec, base, size) for name, spec in header.items()]
    out.sort(key=lambda t: t.start)
    for a, b in itertools.pairwise(out):
        if a.start + a.nbytes > b.start:
            raise InvalidArgument(f"{file}: tensors {a.name!r} and {b.name!r} overlap")
    return out, metadata


def _tensor(file: Path, name: str, spec: object, base: int, size: int) -> TensorInfo:
    where = f"{file}: tensor {name!r}"
    if not isinstance(spec, dict):
        raise InvalidArgument(f"{where}: entry must be an object")
    dtype = spec.get("dtype")
    if dtype not in DTYPES:
        raise InvalidArgument(f"{where}: dtype {dtype!r} is not one of {sorted(DTYPES)}")
    shape = spec.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise InvalidArgument(f"{where}: shape must be a list of ints >= 0, got {shape!r}")
    offsets = spec.get("data_offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise InvalidArgument(f"{where}: data_offsets must be [begin, end], got {offsets!r}")
    nbytes = DTYPES[dtype][2] * math.prod(shape)
    if offsets[1] - offsets[0] != nbytes:
        raise InvalidArgument(
            f"{where}: data_offsets cover {offsets[1] - offsets[0]} bytes, "
            f"dtype {dtype} and shape {shape} need {nbytes}"
        )
    if base + offsets[1] > size:
        raise InvalidArgument(f"{where}: data_offsets end past the end of the file ({size})")
    return TensorInfo(name, dtype, tuple(shape), file, base + offsets[0], nbytes)


def open_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """A checkpoint from a file, a ``model.safetensors.index.json`` or a directory."""
    p = Path(path)
    if p.is_dir():
        index = p / INDEX_NAME
        if index.exists():
            return _sharded(index)
        files = sorted(p.glob("*.safetensors"))
        if not files:
            raise InvalidArgument(f"{p}: no *.safetensors file and no {INDEX_NAME}")
        return _files(files)
    if not p.exists():
        raise InvalidArgument(f"{p}: no such file or directory")
    if p.name.endswith(".index.json"):
        return _sharded(p)
    return _files([p])


def _files(files: list[Path]) -> Checkpoint:
    tensors: list[TensorInfo] = []
    metadata: dict[str, str] = {}
    seen: dict[str, Path] = {}
    for f in files:
        got, meta = read_header(f)
        for t in got:
            if t.name in seen:
                raise InvalidArgument(f"tensor {t.name!r} is in both {seen[t.name]} and {f}")
            seen[t.name] = f
        tensors.extend(got)
        metadata.update(meta)
    return Checkpoint(tuple(files), tuple(tensors), metadata)


def _sharded(index: Path) -> Checkpoint:
    try:
        spec = json.loads(index.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArgument(f"{index}: cannot read the index: {exc}") from exc
    weight_map = spec.get("weight_map") if isinstance(spec, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise InvalidArgument(f"{index}: weight_map must map tensor names to file names")
    names = list(dict.fromkeys(weight_map.values()))
    for n in names:
        if "/" in n or n.startswith(".."):
            raise InvalidArgument(f"{index}: weight_map names a file outside its folder: {n!r}")
    ckpt = _files([index.parent / n for n in names])
    have = {t.name: t.file.name for t in ckpt.tensors}
    for name, file in weight_map.items():
        if have.get(name) != file:
            raise InvalidArgument(f"{index}: tensor {name!r} is not in {file}")
    return ckpt


def read_into(f: int, t: TensorInfo, dest: memoryview) -> None:
    """Read ``t``'s bytes from the open file descriptor ``f`` into ``dest`` (its size)."""
    done = 0
    while done < t.nbytes:
        n = os.preadv(f, [dest[done:]], t.start + done)
        if n <= 0:
            raise InvalidArgument(f"{t.file}: tensor {t.name!r} is truncated")
        done += n


def by_file(tensors: tuple[TensorInfo, ...]) -> Iterator[tuple[Path, list[TensorInfo]]]:
    """The tensors grouped by file, in order."""
    group: list[TensorInfo] = []
    for t in tensors:
        if group and group[0].file != t.file:
            yield group[0].file, group
            group = []
        group.append(t)
    if group:
        yield group[0].file, group


def evict_page_cache(path: Path) -> None:
    """Drop ``path``'s pages from the page cache (so a read after it is a disk read)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
