"""prefetch() and stream(): order, the lookahead bound, early stop, errors at their item."""

from __future__ import annotations

import threading
from concurrent.futures import Future

import numpy as np
import pytest

from tensorcache.client.prefetch import Prefetcher
from tensorcache.errors import InvalidArgument, Unavailable
from tensorcache.testing import FakeCluster

pytestmark = pytest.mark.unit


class Gets:
    """A get that records how many calls run at once; keys in ``block`` wait for ``gate``."""

    def __init__(self, block=(), barrier=None):
        self.lock = threading.Lock()
        self.running = 0
        self.most = 0
        self.started: list[str] = []
        self.gate = threading.Event()
        self.block = set(block)
        self.barrier = barrier

    def __call__(self, key):
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
            self.started.append(key)
        try:
            if self.barrier is not None and key in self.block:
                self.barrier.wait()  # BrokenBarrierError if they do not run together
            elif key in self.block:
                assert self.gate.wait(10)
            if key.startswith("bad"):
                raise Unavailable(f"node down for {key}")
            return key.upper()
        finally:
            with self.lock:
                self.running -= 1


@pytest.fixture
def pf():
    p = Prefetcher(8)
    yield p
    p.close()


@pytest.mark.parametrize("lookahead", [0, 1, 3])
def test_stream_in_order_within_the_bound(pf, lookahead):
    keys = [f"k{i}" for i in range(12)]
    gets = Gets()
    assert list(pf.stream(keys, lookahead, gets)) == [(k, k.upper()) for k in keys]
    assert gets.most <= max(lookahead, 1)
    assert sorted(gets.started) == sorted(keys)


def test_stream_really_runs_lookahead_gets_at_once(pf):
    keys = [f"k{i}" for i in range(8)]
    # the first 4 only return once all 4 run together: a stream that did not
    # keep 4 in flight would break the barrier (10 s) and fail at item 0
    gets = Gets(block=keys[:4], barrier=threading.Barrier(4, timeout=10))
    assert [k for k, _ in pf.stream(keys, 4, gets)] == keys
    assert gets.most == 4


def test_early_stop_cancels_and_drains(pf):
    keys = [f"k{i}" for i in range(50)]
    gets = Gets(block=keys[1:])
    stream = pf.stream(keys, 3, gets)
    assert next(stream) == ("k0", "K0")
    gets.gate.set()  # let the ones in flight finish; close() must wait for them
    stream.close()
    assert gets.running == 0
    assert len(gets.started) <= 1 + 3  # k0 and at most the lookahead: nothing else started


def test_error_surfaces_at_its_item(pf):
    keys = ["a", "b", "bad-c", "d"]
    out = []
    with pytest.raises(Unavailable, match="bad-c"):
        for k, v in pf.stream(keys, 2, Gets()):
            out.append((k, v))
    assert out == [("a", "A"), ("b", "B")]


def test_bad_arguments(pf):
    with pytest.raises(InvalidArgument, match="lookahead must be an int >= 0"):
        pf.stream(["a"], -1, Gets())
    with pytest.raises(InvalidArgument, match="not a single str"):
        pf.stream("abc", 1, Gets())
    with pytest.raises(InvalidArgument, match="keys must be str"):
        list(pf.stream(["a", 3], 1, Gets()))
    pf.close()
    with pytest.raises(InvalidArgument, match="closed"):
        pf.stream(["a"], 1, Gets())


def test_client_prefetch_and_stream():
    with FakeCluster(["a", "b"]) as cluster:
        c = cluster.connect()
        c.put_many({f"w{i}": np.full(3, i) for i in range(6)})
        fut = c.prefetch(["w0", "w5", "missing"])
        assert isinstance(fut, Future)
        got = fut.result(timeout=30)
        assert got["missing"] is None and got["w5"].tolist() == [5, 5, 5]
        keys = ["w0", "w1", "missing", "w2"]
        seen = [(k, None if v is None else int(v[0])) for k, v in c.stream(keys, lookahead=2)]
        assert seen == [("w0", 0), ("w1", 1), ("missing", None), ("w2", 2)]
        for k, _ in c.stream([f"w{i}" for i in range(6)], lookahead=3):
            if k == "w1":
                break  # an early stop leaves the client usable
        assert c.get("w4").tolist() == [4, 4, 4]
        with pytest.raises(InvalidArgument, match="as_ must be one of"):
            c.prefetch(["w0"], as_="tensor")
        with pytest.raises(InvalidArgument, match="not a single str"):
            c.prefetch("w0")
        c.close()
        with pytest.raises(InvalidArgument, match="closed"):
            c.stream(["w0"])
