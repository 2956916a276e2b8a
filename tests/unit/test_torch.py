"""torch tensors through the real client and node logic (in-memory cluster).

Every storable torch dtype round-trips bit-exactly with its dtype, in every
shape class (0-d, empty, non-contiguous, striped); the numpy view of a torch
entry is exact or refused, never raw bits read as numbers; ``out=`` and
``as_``/``device`` are checked with errors naming the field.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tensorcache import codec
from tensorcache.errors import InvalidArgument
from tensorcache.testing import FakeCluster

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.unit

# Every dtype of codec.TORCH_DTYPES this torch has.
DTYPES = [
    getattr(torch, n.removeprefix("torch."))
    for n in codec.TORCH_DTYPES
    if hasattr(torch, n.removeprefix("torch."))
]


def bits(t):
    """The tensor's bytes, as int tensor of its width (compares NaNs and float8 exactly)."""
    if t.numel() == 0:
        return torch.empty(0, dtype=torch.uint8)
    t = t.contiguous().reshape(-1)  # 1-d: a view may change the element width
    return t.view(torch.uint8)


def sample(dtype, shape, seed=0):
    """Varied bytes of ``dtype``: random bits, so every pattern (NaN, inf, subnormal) occurs."""
    g = torch.Generator().manual_seed(seed)
    n = int(np.prod(shape)) * dtype.itemsize
    raw = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)
    if dtype == torch.bool:
        return (raw % 2).bool().reshape(shape)
    return raw.view(dtype).reshape(shape)


def same(a, b):
    return (
        isinstance(b, torch.Tensor)
        and a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(bits(a), bits(b))
    )


@pytest.fixture
def c():
    with FakeCluster(["a", "b", "c"]) as cluster:
        yield cluster.connect(stripe_size="4KiB")


def test_torch_dtype_table_matches_torch():
    for name, (storage, exact) in codec.TORCH_DTYPES.items():
        dt = getattr(torch, name.removeprefix("torch."), None)
        if dt is None:
            continue
        assert np.dtype(storage).itemsize == dt.itemsize, name
        if exact:
            assert torch.zeros(1, dtype=dt).numpy().dtype.str == storage, name


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (7,), (33, 65)], ids=str)
def test_every_dtype_and_shape_round_trips(c, dtype, shape):
    x = sample(dtype, shape)
    c.put("k", x)
    y = c.get("k")
    assert same(x, y), (dtype, shape)
    assert y.is_contiguous()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e5m2, torch.complex64, torch.bool])
def test_striped_non_contiguous_and_views(c, dtype):
    big = sample(dtype, (64, 300), seed=1)  # > 4 KiB: striped
    views = {
        "T": big.T,
        "step": big[::3, 1::2],
        "permute_step": big.permute(1, 0)[::2],
        "narrow": big[5:40, 7:200],
        "expand": big[0:1].expand(50, 300),
    }
    for name, v in views.items():
        assert not v.is_contiguous()
        c.put(name, v)
        got = c.get(name)
        assert same(v.contiguous(), got), name
    c.put("whole", big)
    assert same(big, c.get("whole"))


def test_conj_neg_grad_and_put_many(c):
    z = torch.randn(5, dtype=torch.complex64)
    w = torch.randn(4, requires_grad=True)
    c.put_many({"conj": z.conj(), "neg": z.conj().imag, "grad": w * 2, "np": np.arange(3)})
    assert torch.equal(c.get("conj"), z.conj().resolve_conj())
    assert torch.equal(c.get("neg"), z.conj().imag.resolve_neg())
    assert torch.equal(c.get("grad"), (w * 2).detach())
    got = c.get_many(["conj", "np", "gone"])
    assert isinstance(got["conj"], torch.Tensor) and isinstance(got["np"], np.ndarray)
    assert got["gone"] is None


def test_numpy_reader_of_torch_entries(c):
    f32 = torch.randn(4, 5)
    bf = f32.to(torch.bfloat16)
    c.put_many({"f32": f32, "bf": bf, "f8": f32.to(torch.float8_e4m3fn)})
    # numpy holds float32 exactly: same values, numpy dtype
    a = c.get("f32", as_="numpy")
    assert isinstance(a, np.ndarray) and a.dtype == np.float32 and np.array_equal(a, f32.numpy())
    # bfloat16 and float8: refused as numbers, naming key and dtype...
    with pytest.raises(InvalidArgument, match=r"'bf' holds a torch\.bfloat16.*as_='raw'"):
        c.get("bf", as_="numpy")
    with pytest.raises(InvalidArgument, match=r"float8_e4m3fn"):
        c.get_many(["f32", "f8"], as_="numpy")
    # ...or given as their raw bits when asked
    raw = c.get("bf", as_="raw")
    assert raw.dtype == np.uint16 and np.array_equal(raw, bf.view(torch.int16).numpy().view("<u2"))
    assert c.get("f8", as_="raw").dtype == np.uint8
    # a numpy out of a bfloat16 entry is refused before a byte is written
    out = np.full((4, 5), 7, np.uint16)
    with pytest.raises(InvalidArgument, match=r"numpy has no dtype"):
        c.get("bf", out=out)
    assert (out == 7).all()


def test_torch_reader_of_numpy_entries(c):
    c.put_many(
        {
            "f4": np.arange(6, dtype=np.float32).reshape(2, 3),
            "F": np.asfortranarray(np.arange(12, dtype=np.int64).reshape(3, 4)),
            "u2": np.arange(5, dtype=np.uint16),
            "S": np.array([b"ab", b"c"]),
        }
    )
    assert isinstance(c.get("f4"), np.ndarray)  # as written
    t = c.get("f4", as_="torch")
    assert t.dtype == torch.float32 and torch.equal(t, torch.arange(6.0).reshape(2, 3))
    f = c.get("F", device="cpu")
    assert torch.equal(f, torch.arange(12).reshape(3, 4))  # values, whatever the strides
    assert c.get("u2", as_="torch").dtype == torch.uint16
    with pytest.raises(InvalidArgument, match=r"'S' holds numpy dtype \|S2.*as_='numpy'"):
        c.get("S", as_="torch")


def test_out_fills_in_place_and_checks(c):
    x = sample(torch.bfloat16, (40, 70), seed=3)  # striped at 4 KiB
    c.put("x", x)
    out = torch.empty(40, 70, dtype=torch.bfloat16)
    assert c.get("x", out=out) is out and same(x, out)
    small = torch.arange(5, dtype=torch.int32)
    c.put("s", small)
    o = torch.zeros(5, dtype=torch.int32)
    assert c.get("s", out=o) is o and torch.equal(o, small)
    # same width, other dtype: refused although the storage dtype matches
    with pytest.raises(InvalidArgument, match=r"out is torch\.float16 \(40, 70\).*torch\.bfloat16"):
        c.get("x", out=torch.empty(40, 70, dtype=torch.float16))
    with pytest.raises(InvalidArgument, match=r"out is torch\.bfloat16 \(70, 40\)"):
        c.get("x", out=torch.empty(70, 40, dtype=torch.bfloat16))
    with pytest.raises(InvalidArgument, match=r"out must be a contiguous tensor"):
        c.get("x", out=torch.empty(70, 40, dtype=torch.bfloat16).T)
    with pytest.raises(InvalidArgument, match=r"out is torch\.int32 \(5,\), the stored tensor is"):
        c.get("x", out=o)
    # a numpy-written float32 entry fills a float32 torch out
    c.put("n", np.arange(5, dtype=np.float32))
    of = torch.empty(5)
    assert torch.equal(c.get("n", out=of), torch.arange(5.0))


def test_bad_arguments_name_the_field(c):
    c.put("k", torch.ones(2))
    with pytest.raises(InvalidArgument, match=r"as_ must be one of"):
        c.get("k", as_="tensor")
    with pytest.raises(InvalidArgument, match=r"device must be"):
        c.get("k", device="tpu")
    with pytest.raises(InvalidArgument, match=r"contradicts"):
        c.get("k", device="cpu", as_="numpy")
    with pytest.raises(InvalidArgument, match=r"out must be a numpy.ndarray or a torch.Tensor"):
        c.get("k", out=[0.0, 0.0])
    with pytest.raises(InvalidArgument, match=r"dtype torch\.qint8|torch\.int4|no stable byte"):
        c.put("q", torch.zeros(2, dtype=torch.uint8).view(torch.bits8))
    with pytest.raises(InvalidArgument, match=r"sparse"):
        c.put("sp", torch.eye(3).to_sparse())
    with pytest.raises(InvalidArgument, match=r"meta device"):
        c.put("m", torch.empty(3, device="meta"))
    assert c.get("q") is None and c.get("sp") is None  # nothing stored by a refused put


def test_node_checks_logical_dtype():
    assert codec.check_layout("<u2", (2,), "C", 4, "torch.bfloat16").logical == "torch.bfloat16"
    with pytest.raises(InvalidArgument, match=r"logical_dtype 'torch.float7'"):
        codec.check_layout("<u2", (2,), "C", 4, "torch.float7")
    with pytest.raises(InvalidArgument, match=r"stored as <u2, but dtype is '<f2'"):
        codec.check_layout("<f2", (2,), "C", 4, "torch.bfloat16")


def test_without_torch_nothing_imports_it(tmp_path):
    """A process where torch cannot be imported still imports tensorcache and puts/gets numpy."""
    script = textwrap.dedent(
        """
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked in this test")
        sys.meta_path.insert(0, Block())
        import numpy as np
        import tensorcache
        from tensorcache.testing import FakeCluster
        from tensorcache.errors import InvalidArgument
        with FakeCluster(["a", "b"]) as cluster:
            c = cluster.connect()
            c.put("k", np.arange(10.0))
            assert np.array_equal(c.get("k"), np.arange(10.0))
            assert c.get_many(["k"])["k"].dtype == np.float64
        assert "torch" not in sys.modules, "tensorcache imported torch"
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_compressed_torch_entries_keep_their_dtype(c):
    pytest.importorskip("blosc2")
    x = torch.zeros(300, 200, dtype=torch.bfloat16)  # compressible, striped at 4 KiB
    x[::7] = 1.5
    c.put("z", x, compression="lz4")
    assert same(x, c.get("z"))
    out = torch.empty_like(x)
    assert c.get("z", out=out) is out and same(x, out)
    with pytest.raises(InvalidArgument, match=r"out is torch\.float16"):
        c.get("z", out=torch.empty(300, 200, dtype=torch.float16))
    with pytest.raises(InvalidArgument, match=r"torch\.bfloat16"):
        c.get("z", as_="numpy")
    assert c.get("z", as_="raw").dtype == np.uint16
