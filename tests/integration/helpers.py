"""Shared helpers: polling with a deadline, raw node RPCs, sample arrays.

Raw RPCs go through the wire contract only (proto/tensorcache.proto): the
Put and Get methods are raw byte streams, so they are called with identity
(de)serializers, exactly as a foreign client would.
"""

from __future__ import annotations

import os
import select
import subprocess
import time
from collections.abc import Callable, Iterable
from typing import TypeVar

import grpc
import numpy as np
import pytest

from tensorcache.codec import crc32c
from tensorcache.grpcutil import CHANNEL_OPTIONS, NODE_SERVICE
from tensorcache.proto import tensorcache_pb2 as pb

T = TypeVar("T")

NODE = f"/{NODE_SERVICE}/"
# The client's bulk paths, as connect() options: "local" (the default) puts
# over each node's TCP data channel and gets entries of 256 KiB and more
# straight out of a co-located node's memory; "data" is the data channel
# alone; "grpc" the gRPC byte streams (the portable fallback).
TRANSPORTS: dict[str, dict[str, object]] = {
    "local": {},
    "data": {"local_fastpath": False},
    "grpc": {"transport": "grpc"},
}
RPC_TIMEOUT = 15.0


# ------------------------------------------------------------------ polling
def poll(fn: Callable[[], T], *, timeout: float = 30.0, interval: float = 0.05, what: str) -> T:
    """Call ``fn`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what} (last: {value!r})")
        time.sleep(interval)


def read_line(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> str:
    """The next stdout line of ``proc``, read with a deadline (b"" at EOF fails)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    line = b""
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail(f"no line from pid {proc.pid} within {timeout:.0f}s (got {line!r})")
        ready, _, _ = select.select([fd], [], [], min(left, 0.2))
        if ready:
            # One byte at a time off the raw fd: nothing is buffered past the
            # line, so the next call's select() still sees what follows.
            byte = os.read(fd, 1)
            if not byte:
                pytest.fail(f"pid {proc.pid} closed stdout (exit {proc.poll()}) after {line!r}")
            line += byte
    return line.decode()


# ------------------------------------------------------------------ raw node RPCs
def _channel(address: str) -> grpc.Channel:
    return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)


def raw_put(address: str, messages: Iterable[bytes], timeout: float = RPC_TIMEOUT) -> pb.PutReply:
    """Send a raw Put stream (header bytes, then payload bytes); raises grpc.RpcError."""
    with _channel(address) as ch:
        put = ch.stream_unary(NODE + "Put", request_serializer=None, response_deserializer=None)
        return pb.PutReply.FromString(put(iter(messages), timeout=timeout))


def raw_get(
    address: str, request: pb.GetRequest | bytes, timeout: float = RPC_TIMEOUT
) -> tuple[pb.GetReply, bytes]:
    """Send a raw Get; returns the header and the concatenated payload."""
    raw = request if isinstance(request, bytes) else request.SerializeToString()
    with _channel(address) as ch:
        get = ch.unary_stream(NODE + "Get", request_serializer=None, response_deserializer=None)
        messages = list(get(raw, timeout=timeout))
    assert messages, "a Get stream must start with a header"
    return pb.GetReply.FromString(messages[0]), b"".join(messages[1:])


def raw_delete(address: str, request: pb.DeleteRequest | bytes) -> pb.DeleteReply:
    raw = request if isinstance(request, bytes) else request.SerializeToString()
    with _channel(address) as ch:
        delete = ch.unary_unary(
            NODE + "Delete", request_serializer=None, response_deserializer=None
        )
        return pb.DeleteReply.FromString(delete(raw, timeout=RPC_TIMEOUT))


def node_stat(address: str) -> pb.NodeStats:
    with _channel(address) as ch:
        stat = ch.unary_unary(
            NODE + "Stat",
            request_serializer=pb.StatRequest.SerializeToString,
            response_deserializer=pb.NodeStats.FromString,
        )
        return stat(pb.StatRequest(), timeout=RPC_TIMEOUT, wait_for_ready=True)


def rpc_error(fn: Callable[[], object]) -> grpc.RpcError:
    """Run ``fn`` and return the grpc.RpcError it must raise."""
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value


def tensor_header(
    key: bytes,
    payload: bytes,
    *,
    epoch: int = 0,
    dtype: str = "|u1",
    shape: list[int] | None = None,
    nbytes: int | None = None,
    crc: int | None = None,
    kind: int = pb.TENSOR,
) -> bytes:
    """A serialized PutRequest for one entry whose bytes are ``payload``.

    Every field defaults to the truth about ``payload`` (a flat uint8
    tensor); a test overrides the one it wants to lie about.
    """
    meta = pb.TensorMeta(
        dtype=dtype,
        shape=[len(payload)] if shape is None else shape,
        order="C",
        nbytes=len(payload) if nbytes is None else nbytes,
        crc32c=crc32c(payload) if crc is None else crc,
    )
    return pb.PutRequest(
        epoch=epoch, entries=[pb.EntryPut(key=key, kind=kind, meta=meta)]
    ).SerializeToString()


def get_request(*keys: bytes, epoch: int = 0, kind: int = pb.TENSOR) -> pb.GetRequest:
    return pb.GetRequest(epoch=epoch, keys=[pb.EntryKey(key=k, kind=kind) for k in keys])


# ------------------------------------------------------------------ sample arrays
def sample(dtype: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """A deterministic C-ordered array of ``dtype`` with awkward values."""
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    if dt.kind == "b":
        return rng.integers(0, 2, size=shape).astype(dt)
    if dt.kind in "iu":
        info = np.iinfo(dt)
        native = dt.newbyteorder("=")
        return np.asarray(
            rng.integers(info.min, info.max, size=shape, dtype=native, endpoint=True)
        ).astype(dt)
    if dt.kind == "f":
        out = np.asarray(rng.standard_normal(size=shape) * 1e3).astype(dt)
        flat = out.reshape(-1)
        flat[:3] = [np.nan, np.inf, -0.0][: flat.size]
        return out
    if dt.kind == "c":
        out = np.asarray(
            rng.standard_normal(size=shape) + 1j * rng.standard_normal(size=shape)
        ).astype(dt)
        flat = out.reshape(-1)
        flat[:1] = complex(np.nan, -np.inf)
        return out
    if dt.kind in "mM":
        ints = np.asarray(rng.integers(-(2**62), 2**62, size=shape, dtype=np.int64))
        out = ints.view(dt)
        out.reshape(-1)[:1] = np.datetime64("NaT") if dt.kind == "M" else np.timedelta64("NaT")
        return out
    if dt.kind == "S":  # arbitrary bytes, NULs included
        raw = rng.integers(0, 256, size=(*shape, dt.itemsize), dtype=np.uint8)
        return np.ascontiguousarray(raw).view(dt).reshape(shape)
    if dt.kind == "U":  # any code point except surrogates, astral planes included
        cps = rng.integers(1, 0x10FFFF - 0x800, size=(*shape, dt.itemsize // 4), dtype=np.uint32)
        cps[cps >= 0xD800] += 0x800
        return np.ascontiguousarray(cps.astype(dt.byteorder + "u4")).view(dt).reshape(shape)
    raise ValueError(f"no sample for {dtype}")


def assert_same(got: np.ndarray | None, want: np.ndarray) -> None:
    """Exact equality: dtype (byte order included), shape and every byte."""
    assert got is not None, "expected a hit, got a miss"
    assert isinstance(got, np.ndarray)
    assert got.dtype == want.dtype and got.dtype.str == want.dtype.str
    assert got.shape == want.shape
    assert got.tobytes() == want.tobytes()  # C-order bytes whatever the layouts


def settled(client: object, timeout: float = 30.0) -> list:
    """``client.stats()`` once no node has a put in flight (bytes_reserved == 0)."""

    def check() -> list | None:
        stats = client.stats()  # type: ignore[attr-defined]
        return stats if all(s.bytes_reserved == 0 for s in stats) else None

    return poll(check, timeout=timeout, what="every node's bytes_reserved to return to 0")


def total(stats: Iterable[object], field: str) -> int:
    return sum(getattr(s, field) for s in stats)


def lose_first_reply(
    monkeypatch: pytest.MonkeyPatch, which: Callable[[pb.EntryPut], bool]
) -> list[bytes]:
    """Make the first data-channel put with an entry ``which`` picks lose its reply.

    The node stores the put; the client then sees ``Unavailable``, as when a
    reset or a black hole cuts the connection after the commit, and resends
    it (over gRPC). Returns the list the lost put's picked keys go into.
    """
    from tensorcache.client import datachannel
    from tensorcache.errors import Unavailable

    real = datachannel.DataConn.put
    lost: list[bytes] = []

    def put_then_lose_the_reply(self, header, views):  # type: ignore[no-untyped-def]
        reply = real(self, header, views)
        picked = [e.key for e in header.entries if which(e)]
        if picked and not lost:
            lost.extend(picked)
            raise Unavailable("the reply was lost (test)")  # stored on the node
        return reply

    monkeypatch.setattr(datachannel.DataConn, "put", put_then_lose_the_reply)
    return lost
