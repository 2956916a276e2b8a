"""The staging ring of device gets (client/staging.py), on CPU.

The device here is the slowest one possible: a copy runs only when someone
waits for it (a slot's reuse, ``finish``), and every copy checks that its
source bytes are still the ones it was queued with. So a ring that reused a
slot before the copy reading it ran would fail here deterministically, and
the counted waits show the receive of a wave running while the previous
wave's copies are still queued (the overlap). The real CUDA device
(client/torchio.py ``CudaDevice``) is tested in tests/gpu.
"""

from __future__ import annotations

import numpy as np
import pytest

from tensorcache import codec
from tensorcache.client import staging
from tensorcache.errors import InvalidArgument
from tensorcache.testing import FakeCluster

pytestmark = pytest.mark.unit


class LazyDevice:
    """Copies queue up and run only when waited for; each checks its source is unchanged."""

    def __init__(self):
        self.queue = []  # (seq, src, crc, dst, offset)
        self.seq = 0
        self.done = 0
        self.copies = 0
        self.began = 0
        self.finished = 0
        self.hosts = []

    def begin(self):
        self.began += 1

    def host(self, nbytes):
        buf = np.full(nbytes, 0xEE, np.uint8)
        self.hosts.append(nbytes)
        return buf

    def empty(self, nbytes):
        return np.full(nbytes, 0xAB, np.uint8)

    def copy(self, src, dst, offset):
        assert src.dtype == np.uint8 and src.ndim == 1
        self.seq += 1
        self.queue.append((self.seq, src, codec.crc32c(src), dst, offset))

    def mark(self):
        return self.seq

    def wait(self, token):
        while self.queue and self.queue[0][0] <= token:
            _, src, crc, dst, off = self.queue.pop(0)
            assert codec.crc32c(src) == crc, "a slot was overwritten before its copy ran"
            dst[off : off + src.nbytes] = src
            self.copies += 1
            self.done = max(self.done, token)

    def finish(self):
        self.finished += 1  # like a GPU: no host wait; the caller's later work is ordered

    def flush(self):
        """What the caller's later work on the device sees: every copy done."""
        self.wait(self.seq)


def stage(c, keys, slots=4, slot_bytes=None, dest_for=None):
    device = LazyDevice()
    ring = staging.Ring(device, slots, slot_bytes or c.stripe_size)

    def default(key, layout):
        return device.empty(layout.nbytes)

    got = staging.get_many(keys, ring, c, dest_for or default)
    device.flush()
    return got, ring, device


def stored(got, key):
    s = got[key]
    assert s.dest is not None, key
    layout = s.layout
    arr = s.dest.view(layout.dtype)
    if layout.order == "F":
        return arr.reshape(layout.shape[::-1]).T
    return arr.reshape(layout.shape)


@pytest.fixture
def c():
    with FakeCluster(["a", "b", "c"]) as cluster:
        yield cluster.connect(stripe_size="16KiB")


def test_striped_tensors_flow_through_the_ring_in_waves(c):
    rng = np.random.default_rng(0)
    big = {f"big{i}": rng.standard_normal(20_000 + 999 * i).astype(np.float32) for i in range(3)}
    c.put_many(big)  # ~80 KiB each: 5-6 stripes of 16 KiB
    got, ring, device = stage(c, list(big), slots=4)
    for k, v in big.items():
        assert np.array_equal(stored(got, k), v)
    # 17 stripes through 4 slots: slots were reused while their copies were
    # still queued (the device had not run them): receive overlapped copies
    assert ring.waits >= 17 // 2 - 2
    assert device.began == 1 and device.finished == 1
    assert device.hosts == [16 * 1024] * 4  # the ring's slots, allocated once, no extras


def test_small_tensors_pack_into_slots_and_overflow_safely(c):
    small = {f"s{i}": np.arange(i * 50, dtype=np.int16) for i in range(200)}  # 0..20 KB each
    small["zero-d"] = np.array(3.5)
    small["F"] = np.asfortranarray(np.arange(12.0).reshape(3, 4))
    c.put_many(small)
    keys = [*small, "missing"]
    got, _, device = stage(c, keys, slots=4, slot_bytes=16 * 1024)
    assert got["missing"].dest is None
    for k, v in small.items():
        assert np.array_equal(stored(got, k), v), k
    # more bytes than 4 slots hold: the rest went to extra buffers, never a lapped slot
    assert len(device.hosts) > 4


def test_the_ring_is_reused_across_gets(c):
    c.put("w", np.arange(30_000, dtype=np.float64))  # 240 KB: 15 stripes
    device = LazyDevice()
    ring = staging.Ring(device, 4, c.stripe_size)
    for _ in range(3):
        got = staging.get_many(["w"], ring, c, lambda k, lay: device.empty(lay.nbytes))
        device.flush()
        assert np.array_equal(stored(got, "w"), np.arange(30_000, dtype=np.float64))
    assert device.hosts == [c.stripe_size] * 4  # three gets, the same four buffers


def test_torch_and_compressed_entries_keep_their_layout(c):
    torch = pytest.importorskip("torch")
    x = torch.randn(100, 90).to(torch.bfloat16)  # striped
    c.put("bf", x)
    got, _, _ = stage(c, ["bf"])
    s = got["bf"]
    assert s.layout.logical == "torch.bfloat16" and s.layout.shape == (100, 90)
    assert np.array_equal(s.dest.view(np.int16), x.view(torch.int16).reshape(-1).numpy())
    pytest.importorskip("blosc2")
    z = np.zeros(50_000, np.float32)
    z[::9] = 1
    c.put("z", z, compression="lz4")
    got, _, _ = stage(c, ["z"])
    assert np.array_equal(stored(got, "z"), z)


def test_a_stripe_replaced_under_the_reader(c):
    """A newer put between the manifest read and the stripe reads: the stripes the
    manifest named are gone; the get reads the manifest again and returns the
    new value, never a mix; a key rewritten on every read becomes a miss."""
    old, new = np.arange(10_000, dtype=np.float32), -np.arange(10_000, dtype=np.float32)
    c.put("v", old)
    device = LazyDevice()
    puts = []

    def put_newer_once(key, layout):
        if not puts:
            puts.append(c.put(key, new))  # frees the stripes of ``old``
        return device.empty(layout.nbytes)

    got, _, _ = stage(c, ["v"], dest_for=put_newer_once)
    assert np.array_equal(stored(got, "v"), new)

    def put_newer_always(key, layout):
        puts.append(c.put(key, old if len(puts) % 2 else new))
        return device.empty(layout.nbytes)

    got, _, _ = stage(c, ["v"], dest_for=put_newer_always)
    assert got["v"].dest is None  # a miss after the bounded re-reads, not garbage
    assert len(puts) == 1 + 3


def test_dest_for_can_refuse_before_any_copy(c):
    c.put("x", np.arange(40_000, dtype=np.int32))
    device = LazyDevice()
    ring = staging.Ring(device, 4, c.stripe_size)

    def refuse(key, layout):
        raise InvalidArgument(f"out is wrong for {key}")

    with pytest.raises(InvalidArgument, match="out is wrong for x"):
        staging.get_many(["x"], ring, c, refuse)
    assert device.copies == 0 and device.finished == 1


def test_a_failed_get_still_guards_the_slots_it_filled(c):
    """A refused key after others were queued: their slots keep their copies' tokens,
    so the next get through the ring waits instead of overwriting queued bytes."""
    c.put_many({"a": np.arange(1000, dtype=np.int64), "b": np.arange(10.0)})
    device = LazyDevice()
    ring = staging.Ring(device, 4, c.stripe_size)
    dests = {}

    def refuse_b(key, layout):
        if key == "b":
            raise InvalidArgument("b refused")
        dests[key] = device.empty(layout.nbytes)
        return dests[key]

    with pytest.raises(InvalidArgument, match="b refused"):
        staging.get_many(["a", "b"], ring, c, refuse_b)
    assert device.copies == 0  # a's copy is queued, not run (no host wait)
    c.put("x", np.full(1000, 7, np.int64))
    for _ in range(5):  # laps of the ring: each must wait for the queued copy first
        staging.get_many(["x"], ring, c, lambda k, lay: device.empty(lay.nbytes))
    device.flush()
    assert np.array_equal(dests["a"].view(np.int64), np.arange(1000))


def test_ring_needs_an_even_number_of_slots():
    with pytest.raises(ValueError, match="even number"):
        staging.Ring(LazyDevice(), 3, 1024)


class TorchHostDevice:
    """The torch side of a staged get with CPU tensors as the device (copies at once)."""

    def __init__(self):
        import torch

        self.torch = torch

    def begin(self):
        pass

    def host(self, nbytes):
        return np.empty(nbytes, np.uint8)

    def empty(self, nbytes):
        return self.torch.empty(nbytes, dtype=self.torch.uint8)

    def copy(self, src, dst, offset):
        dst[offset : offset + src.nbytes].copy_(self.torch.from_numpy(src))

    def mark(self):
        return None

    def wait(self, token):
        pass

    def finish(self):
        pass


def test_staged_get_to_torch_tensors(c):
    torch = pytest.importorskip("torch")
    from tensorcache.client import torchio
    from tensorcache.client.present import Want

    ring = staging.Ring(TorchHostDevice(), 4, c.stripe_size)
    values = {
        "bf": torch.randn(120, 70).to(torch.bfloat16),  # striped
        "f8": torch.randn(7).to(torch.float8_e5m2),
        "zero-d": torch.tensor(True),
        "empty": torch.empty(0, 3, dtype=torch.complex64),
    }
    c.put_many(values)
    c.put("F", np.asfortranarray(np.arange(20_000, dtype=np.int64).reshape(100, 200)))
    got = torchio.staged_get(c, [*values, "F", "missing"], Want(as_="torch"), ring)
    for k, v in values.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert torch.equal(got[k].reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8))
    assert torch.equal(got["F"], torch.arange(20_000).reshape(100, 200))
    assert got["missing"] is None

    out = torch.empty(120, 70, dtype=torch.bfloat16)
    assert torchio.staged_get(c, ["bf"], Want(out=out), ring)["bf"] is out
    assert torch.equal(out, values["bf"])
    with pytest.raises(InvalidArgument, match=r"out is torch\.float16 \(120, 70\)"):
        torchio.staged_get(c, ["bf"], Want(out=out.to(torch.float16)), ring)
    with pytest.raises(InvalidArgument, match=r"out must be a contiguous"):
        torchio.staged_get(c, ["bf"], Want(out=torch.empty(70, 120, dtype=torch.bfloat16).T), ring)
    c.put("S", np.array([b"abc"]))
    with pytest.raises(InvalidArgument, match=r"'S' holds numpy dtype \|S3"):
        torchio.staged_get(c, ["S"], Want(as_="torch"), ring)
    assert c.metrics()["staged_gets"] >= 6
