"""torch tensors on CUDA through real nodes (marked ``gpu``: skipped without CUDA).

The staging ring's reuse and overlap rules are tested on CPU
(tests/unit/test_staging.py); these check the CUDA device side: streams,
events, pinned buffers, and a put of a tensor written on a side stream.
"""

from __future__ import annotations

import pytest

import tensorcache
from tensorcache.apps.cluster import LocalCluster
from tensorcache.errors import InvalidArgument

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.integration,
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def same(a, b):
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    a, b = a.detach().cpu(), b.detach().cpu()
    return a.numel() == 0 or torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)
    )


@pytest.fixture
def tc(cluster: LocalCluster, transport):
    with tensorcache.connect(cluster.router_address, stripe_size="1MiB", **transport) as c:
        yield c


def test_get_to_cuda_every_shape(tc, prefix):
    values = {
        f"{prefix}bf-striped": torch.randn(3000, 1000).to(torch.bfloat16),  # 6 MB: 6 stripes
        f"{prefix}f8": torch.randn(100, 100).to(torch.float8_e4m3fn),
        f"{prefix}zero-d": torch.tensor(1.5, dtype=torch.float64),
        f"{prefix}empty": torch.empty(0, 5, dtype=torch.int8),
        f"{prefix}bool": torch.rand(77) > 0.5,
    }
    tc.put_many(values)
    for k, v in values.items():
        t = tc.get(k, device="cuda:0")
        assert t.device.type == "cuda" and same(v, t), k
    got = tc.get_many([*values, f"{prefix}missing"], device="cuda")
    assert got.pop(f"{prefix}missing") is None
    assert all(got[k].is_cuda and same(v, got[k]) for k, v in values.items())
    for k, t in tc.stream(list(values), lookahead=2, device="cuda:0"):
        assert same(values[k], t)


def test_get_into_cuda_out(tc, prefix):
    x = torch.randn(2048, 1024, dtype=torch.float32)  # 8 MB: striped
    tc.put(f"{prefix}x", x)
    out = torch.empty(2048, 1024, device="cuda")
    assert tc.get(f"{prefix}x", out=out) is out
    assert torch.equal(out.cpu(), x)
    with pytest.raises(InvalidArgument, match=r"out is torch\.float16"):
        tc.get(f"{prefix}x", out=torch.empty(2048, 1024, device="cuda", dtype=torch.float16))
    with pytest.raises(InvalidArgument, match=r"out is torch\.float32 \(1024, 2048\)"):
        tc.get(f"{prefix}x", out=torch.empty(1024, 2048, device="cuda"))


def test_put_of_a_tensor_written_on_a_side_stream(tc, prefix):
    """No sync between the producer's stream and the put: the stored bytes are the written ones."""
    side = torch.cuda.Stream()
    x = torch.zeros(4096, 4096, device="cuda")
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # keep the side stream busy so a racing copy reads zeros
        x.fill_(7.0)
    tc.put(f"{prefix}side", x)  # no side.synchronize() on purpose
    got = tc.get(f"{prefix}side")
    assert torch.equal(got, torch.full((4096, 4096), 7.0))


def test_cuda_put_and_numpy_compat(tc, prefix):
    x = torch.randn(500, 300, device="cuda").to(torch.bfloat16)
    tc.put(f"{prefix}cu", x)
    assert same(x, tc.get(f"{prefix}cu", device="cuda"))
    assert same(x, tc.get(f"{prefix}cu"))  # as written: a torch tensor, on the CPU
    with pytest.raises(InvalidArgument, match=r"torch\.bfloat16"):
        tc.get(f"{prefix}cu", as_="numpy")
