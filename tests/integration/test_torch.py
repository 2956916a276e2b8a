"""torch tensors through real nodes, over every bulk path (co-located, data channel, gRPC)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

import tensorcache
from tensorcache.apps.cluster import LocalCluster
from tensorcache.errors import InvalidArgument

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.integration

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn, torch.int64]
DTYPES += [torch.bool, torch.complex64, torch.uint8]


def rand(dtype, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = int(np.prod(shape)) * dtype.itemsize
    raw = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)
    if dtype == torch.bool:
        return (raw % 2).bool().reshape(shape)
    return raw.view(dtype).reshape(shape)


def same(a, b):
    if not isinstance(b, torch.Tensor) or a.dtype != b.dtype or a.shape != b.shape:
        return False
    return a.numel() == 0 or torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)
    )


@pytest.fixture
def tc(cluster: LocalCluster, transport):
    with tensorcache.connect(cluster.router_address, stripe_size="256KiB", **transport) as c:
        yield c


def test_put_get_every_path(tc, prefix):
    values = {f"{prefix}{dt}": rand(dt, (37, 129), seed=i) for i, dt in enumerate(DTYPES)}
    values[f"{prefix}zero-d"] = torch.tensor(2.5, dtype=torch.bfloat16)
    values[f"{prefix}empty"] = torch.empty(0, 4, dtype=torch.float8_e5m2)
    values[f"{prefix}strided"] = rand(torch.bfloat16, (64, 90))[::2, 3:]
    # over the 256 KiB stripe size: cut into stripes on several nodes
    values[f"{prefix}striped"] = rand(torch.bfloat16, (1000, 700), seed=9)
    for k, v in values.items():
        tc.put(k, v)
        assert same(v, tc.get(k)), k
        assert same(v, tc.get(k, device="cpu")), k
    got = tc.get_many(list(values))
    assert all(same(v, got[k]) for k, v in values.items())
    keys = {k + "/many": v for k, v in values.items()}
    tc.put_many(keys)
    got = tc.get_many([*keys, f"{prefix}missing"], device="cpu")
    assert got.pop(f"{prefix}missing") is None
    assert all(same(keys[k], got[k]) for k in keys)


def test_out_fills_striped_and_small(tc, prefix):
    big = rand(torch.bfloat16, (1000, 700), seed=4)
    tc.put(f"{prefix}big", big)
    out = torch.empty_like(big)
    assert tc.get(f"{prefix}big", out=out) is out and same(big, out)
    with pytest.raises(InvalidArgument, match=r"out is torch\.float16 \(1000, 700\)"):
        tc.get(f"{prefix}big", out=torch.empty(1000, 700, dtype=torch.float16))
    with pytest.raises(InvalidArgument, match=r"out is torch\.bfloat16 \(700, 1000\)"):
        tc.get(f"{prefix}big", out=torch.empty(700, 1000, dtype=torch.bfloat16))
    assert same(big, tc.get(f"{prefix}big"))  # a refused get leaves the entry as it was


def test_numpy_reader_of_bfloat16(tc, prefix):
    bf = torch.randn(300, 500).to(torch.bfloat16)  # striped
    tc.put(f"{prefix}bf", bf)
    with pytest.raises(InvalidArgument, match=r"torch\.bfloat16.*as_='raw'"):
        tc.get(f"{prefix}bf", as_="numpy")
    raw = tc.get(f"{prefix}bf", as_="raw")
    assert raw.dtype == np.uint16
    assert np.array_equal(raw, bf.view(torch.int16).numpy().view(np.uint16))


def test_process_without_torch_reads_torch_entries(cluster: LocalCluster, prefix):
    """A numpy-only worker (torch not importable) reads what a torch worker wrote."""
    with tensorcache.connect(cluster.router_address) as c:
        c.put(f"{prefix}f32", torch.arange(6, dtype=torch.float32))
        c.put(f"{prefix}bf", torch.ones(4, dtype=torch.bfloat16))
    script = textwrap.dedent(
        f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("blocked")
        sys.meta_path.insert(0, Block())
        import numpy as np, tensorcache
        with tensorcache.connect({cluster.router_address!r}) as c:
            a = c.get({prefix + "f32"!r})
            assert type(a) is np.ndarray and a.dtype == np.float32, a
            assert np.array_equal(a, np.arange(6, dtype=np.float32))
            try:
                c.get({prefix + "bf"!r})
            except tensorcache.InvalidArgument as exc:
                assert "torch.bfloat16" in str(exc), exc
            else:
                raise SystemExit("a bfloat16 entry was returned to a numpy reader")
            assert c.get({prefix + "bf"!r}, as_="raw").tolist() == [0x3F80] * 4
        assert "torch" not in sys.modules
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_prefetch_and_stream_torch(tc, prefix):
    layers = {f"{prefix}layer{i}": rand(torch.bfloat16, (300, 257), seed=i) for i in range(6)}
    tc.put_many(layers)
    fut = tc.prefetch([*layers, f"{prefix}missing"], device="cpu")
    got = fut.result(timeout=60)
    assert got.pop(f"{prefix}missing") is None
    assert all(same(layers[k], v) for k, v in got.items())
    order = [*layers][::-1]
    order.insert(2, f"{prefix}missing")
    seen = list(tc.stream(order, lookahead=3))
    assert [k for k, _ in seen] == order
    for k, v in seen:
        assert v is None if k.endswith("missing") else same(layers[k], v)
    for i, _ in enumerate(tc.stream(list(layers), lookahead=2)):
        if i == 1:
            break  # an early stop; the client stays usable
    assert same(layers[f"{prefix}layer5"], tc.get(f"{prefix}layer5"))
