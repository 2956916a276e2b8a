"""``tensorcache load``: safetensors checkpoints streamed into a real cluster.

- a file, a sharded checkpoint (its index) and a directory load, and every
  tensor reads back exactly (dtype, shape, bytes) under ``<prefix>t/<name>``;
  the manifest (the commit point) lists them all;
- the command prints a progress bar (tqdm, bytes per second) and says it
  verified; loading a committed revision again does nothing; ``--pin`` pins;
- a bad file fails with exit code 2 naming the problem and writes nothing;
- peak memory: loading a 146 MiB checkpoint whose largest tensor is 12 MiB
  grows the loader's RSS by less than 64 MiB + the largest tensor (measured
  in a subprocess: its peak RSS, VmHWM, against its RSS before the load).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import tensorcache
from tensorcache.torch import read_manifest

from .helpers import assert_same, total

safetensors_numpy = pytest.importorskip("safetensors.numpy")

pytestmark = pytest.mark.integration

MIB = 1024 * 1024


def checkpoint(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {
        "embed.weight": rng.standard_normal((1000, 64)).astype(np.float32),
        "norm.weight": np.ones(64, np.float16),
        "positions": np.arange(128, dtype=np.int64),
        "flags": rng.integers(0, 2, 33).astype(bool),
        "empty": np.zeros((0, 3), np.float32),
        "big": rng.standard_normal(3 * MIB).astype(np.float32),  # 12 MiB: striped, own buffer
    }
    for i in range(3):
        out[f"layers.{i}.w"] = rng.standard_normal((64, 64)).astype(np.float16)
    return out


def load(router: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tensorcache", "load", *args, "--router", router],
        capture_output=True,
        text=True,
        timeout=120,
    )


def check_revision(c, prefix: str, want: dict[str, np.ndarray]) -> None:
    manifest = read_manifest(c, prefix)
    assert manifest is not None and set(manifest.tensors) == set(want)
    for name, v in want.items():
        rec = manifest.tensors[name]
        assert rec.shape == v.shape and rec.dtype == v.dtype.name and rec.nbytes == v.nbytes
        assert_same(c.get(f"{prefix}t/{name}"), v)


def test_load_files_shards_and_directories(cluster, tmp_path, prefix):
    want = checkpoint(1)
    single = tmp_path / "model.safetensors"
    safetensors_numpy.save_file(want, str(single), metadata={"source": "test"})
    shard_dir = tmp_path / "sharded"
    shard_dir.mkdir()
    names = sorted(want)
    weight_map = {}
    for i, part in enumerate((names[:4], names[4:])):
        file = f"model-{i + 1:05d}-of-00002.safetensors"
        safetensors_numpy.save_file({k: want[k] for k in part}, str(shard_dir / file))
        weight_map.update(dict.fromkeys(part, file))
    (shard_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))

    router = cluster.router_address
    r = load(router, str(single), "--prefix", f"{prefix}file/")
    assert r.returncode == 0, r.stderr
    assert "verified" in r.stdout and "GB/s" in r.stdout
    assert "B/s" in r.stderr and "100%" in r.stderr  # the tqdm bar: bytes and their rate
    r = load(router, str(shard_dir / "model.safetensors.index.json"), "--prefix", f"{prefix}idx/")
    assert r.returncode == 0, r.stderr
    r = load(router, str(shard_dir), "--prefix", f"{prefix}dir/", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    with tensorcache.connect(router) as c:
        for rev in ("file/", "idx/", "dir/"):
            check_revision(c, prefix + rev, want)
        assert read_manifest(c, f"{prefix}file/").metadata == {"source": "test"}
        r = load(router, str(single), "--prefix", f"{prefix}file/")
        assert r.returncode == 0 and "already in the cluster" in r.stdout


def test_load_pin(make_cluster, tmp_path, prefix):
    cl = make_cluster(2, capacity="64MiB", pinned_capacity="32MiB")
    want = checkpoint(2)
    path = tmp_path / "m.safetensors"
    safetensors_numpy.save_file(want, str(path))
    r = load(cl.router_address, str(path), "--prefix", f"{prefix}rev/", "--pin", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "pinned" in r.stdout
    with tensorcache.connect(cl.router_address) as c:
        assert total(c.stats(), "pinned_bytes") > sum(v.nbytes for v in want.values())
        for i in range(40):  # 160 MiB of unpinned puts through 128 MiB
            c.put(f"{prefix}churn/{i}", np.full(MIB, i, np.float32))
        check_revision(c, f"{prefix}rev/", want)


def test_a_bad_file_fails_cleanly_and_writes_nothing(cluster, tmp_path, prefix):
    path = tmp_path / "bad.safetensors"
    header = json.dumps({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    r = load(cluster.router_address, str(path), "--prefix", f"{prefix}bad/")
    assert r.returncode == 2
    assert "tensor 'x'" in r.stderr and "need 16" in r.stderr
    r = load(cluster.router_address, str(tmp_path / "nope"), "--prefix", f"{prefix}bad/")
    assert r.returncode == 2 and "no such file" in r.stderr
    r = load(cluster.router_address, str(path), "--prefix", "no-slash")
    assert r.returncode == 2 and "prefix" in r.stderr
    with tensorcache.connect(cluster.router_address) as c:
        assert read_manifest(c, f"{prefix}bad/") is None
        assert c.get(f"{prefix}bad/t/x") is None


PEAK_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import tensorcache
    from tensorcache.torch import load_checkpoint

    def status(field):  # kB in /proc/self/status
        with open("/proc/self/status") as f:
            line = next(line for line in f if line.startswith(field + ":"))
        return int(line.split()[1]) * 1024

    router, path, prefix = sys.argv[1:]
    with tensorcache.connect(router) as c:
        c.stats()  # connections and threads up before the baseline
        before = status("VmRSS")
        report = load_checkpoint(c, path, prefix, verify=True)
        # VmHWM: this process image's peak RSS (getrusage's ru_maxrss is not:
        # Linux carries it over from the parent across fork and exec).
        peak = status("VmHWM")
    print(json.dumps({"before": before, "peak": peak, "nbytes": report.nbytes}))
    """
)


def test_peak_memory_is_a_batch_plus_the_largest_tensor(make_cluster, tmp_path, prefix):
    cl = make_cluster(3, capacity="256MiB")
    rng = np.random.default_rng(3)
    tensors = {f"big.{i}": rng.standard_normal(3 * MIB).astype(np.float32) for i in range(8)}
    tensors.update(
        {f"small.{i}": rng.standard_normal(64 * 1024).astype(np.float32) for i in range(200)}
    )
    path = tmp_path / "m.safetensors"
    safetensors_numpy.save_file(tensors, str(path))
    largest = 12 * MIB
    total_bytes = sum(v.nbytes for v in tensors.values())
    assert total_bytes > 140 * MIB  # over twice the bound below
    del tensors
    r = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, cl.router_address, str(path), f"{prefix}rev/"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["nbytes"] == total_bytes
    grew = got["peak"] - got["before"]
    assert grew < 64 * MIB + largest, f"peak RSS grew by {grew / MIB:.1f} MiB"
