"""safetensors parsing (tensorcache/torch/checkpoint.py), checked against the reference writer."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from tensorcache.errors import InvalidArgument
from tensorcache.torch.checkpoint import open_checkpoint, read_into
from tensorcache.torch.tensors import from_buffer

safetensors_numpy = pytest.importorskip("safetensors.numpy")

pytestmark = pytest.mark.unit


def sample() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "emb.weight": rng.standard_normal((50, 8)).astype(np.float32),
        "layers.0.w": rng.standard_normal((8, 8)).astype(np.float16),
        "layers.0.b": np.arange(8, dtype=np.int64),
        "mask": np.array([True, False, True]),
        "scalar": np.array(3.5, dtype=np.float64),
        "empty": np.zeros((0, 4), np.float32),
    }


def read_all(path: Path) -> dict[str, np.ndarray]:
    ckpt = open_checkpoint(path)
    out = {}
    import os

    for t in ckpt.tensors:
        buf = bytearray(t.nbytes)
        fd = os.open(t.file, os.O_RDONLY)
        try:
            read_into(fd, t, memoryview(buf))
        finally:
            os.close(fd)
        out[t.name] = from_buffer(t.dtype, t.shape, memoryview(buf))
    return out


def assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert got[k].tobytes() == v.tobytes(), k


def test_a_file_reads_back_exactly(tmp_path):
    want = sample()
    path = tmp_path / "m.safetensors"
    safetensors_numpy.save_file(want, str(path), metadata={"format": "np"})
    ckpt = open_checkpoint(path)
    assert ckpt.metadata == {"format": "np"}
    assert ckpt.nbytes == sum(v.nbytes for v in want.values())
    assert ckpt.largest == want["emb.weight"].nbytes
    starts = [t.start for t in ckpt.tensors]
    assert starts == sorted(starts)  # sequential reads
    assert_same(read_all(path), want)


def test_sharded_checkpoints_and_directories(tmp_path):
    want = sample()
    names = sorted(want)
    shards = {"a.safetensors": names[:3], "b.safetensors": names[3:]}
    weight_map = {}
    for file, keys in shards.items():
        safetensors_numpy.save_file({k: want[k] for k in keys}, str(tmp_path / file))
        weight_map.update(dict.fromkeys(keys, file))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert_same(read_all(tmp_path / "model.safetensors.index.json"), want)
    assert_same(read_all(tmp_path), want)  # the directory: its index
    (tmp_path / "model.safetensors.index.json").unlink()
    assert_same(read_all(tmp_path), want)  # the directory: every file


def raw_file(path: Path, header: object, data: bytes = b"") -> Path:
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return path


@pytest.mark.parametrize(
    ("header", "data", "match"),
    [
        ({"x": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, "dtype 'F33'"),
        ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 8, "need 8"),
        ({"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, "shape"),
        ({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, "past the end"),
        ({"x": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 4, "data_offsets"),
        (
            {
                "x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "y": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
            },
            b"\0" * 8,
            "overlap",
        ),
        ([1, 2], b"", "JSON object"),
        ({"__metadata__": {"a": 1}}, b"", "__metadata__"),
    ],
)
def test_bad_files_are_refused_naming_the_problem(tmp_path, header, data, match):
    path = raw_file(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(InvalidArgument, match=match) as exc:
        open_checkpoint(path)
    assert str(path) in str(exc.value)


def test_not_safetensors_at_all(tmp_path):
    (tmp_path / "short.safetensors").write_bytes(b"abc")
    with pytest.raises(InvalidArgument, match="shorter than 8"):
        open_checkpoint(tmp_path / "short.safetensors")
    (tmp_path / "huge.safetensors").write_bytes(struct.pack("<Q", 1 << 40))
    with pytest.raises(InvalidArgument, match="header length"):
        open_checkpoint(tmp_path / "huge.safetensors")
    with pytest.raises(InvalidArgument, match="no such file"):
        open_checkpoint(tmp_path / "missing.safetensors")
    (tmp_path / "d").mkdir()
    with pytest.raises(InvalidArgument, match=r"no \*\.safetensors"):
        open_checkpoint(tmp_path / "d")


def test_index_errors(tmp_path):
    safetensors_numpy.save_file({"a": np.ones(2, np.float32)}, str(tmp_path / "a.safetensors"))
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"b": "a.safetensors"}}))
    with pytest.raises(InvalidArgument, match=r"'b' is not in a\.safetensors"):
        open_checkpoint(index)
    index.write_text(json.dumps({"weight_map": {"a": "../a.safetensors"}}))
    with pytest.raises(InvalidArgument, match="outside its folder"):
        open_checkpoint(index)
    index.write_text("{")
    with pytest.raises(InvalidArgument, match="cannot read the index"):
        open_checkpoint(index)
    safetensors_numpy.save_file({"a": np.ones(2, np.float32)}, str(tmp_path / "b.safetensors"))
    index.unlink()
    with pytest.raises(InvalidArgument, match="in both"):
        open_checkpoint(tmp_path)
