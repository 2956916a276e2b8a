"""Property tests (hypothesis) of everything that parses wire input, in-process.

Each property states what any input may lead to: a value, or the typed
error the contract names (InvalidArgument, ProtocolError, PeerClosed), never
another exception. The node's own request handling (NodeOps) is driven with
arbitrary headers and must release every reservation it makes and leave
what it stored before untouched. The same inputs against real processes and
sockets: tests/integration/test_fuzz_wire.py.
"""

from __future__ import annotations

import contextlib
import random
import socket
import threading

import grpc
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tensorcache import codec
from tensorcache.dataproto import (
    FRAME,
    MAGIC,
    MAX_HEADER,
    OP_DELETE,
    OP_FILL,
    OP_GET,
    PeerClosed,
    Reader,
)
from tensorcache.errors import InvalidArgument, ProtocolError, TensorCacheError
from tensorcache.keys import MAX_KEY_BYTES, check_key_bytes, encode_key
from tensorcache.node.ops import EpochView, NodeOps
from tensorcache.node.payload import split_payload
from tensorcache.node.rings import RingView
from tensorcache.node.store import Store
from tensorcache.node.validate import parse_header
from tensorcache.proto import tensorcache_pb2 as pb

pytestmark = pytest.mark.unit

# Bounded and reproducible: no example database, a fixed budget per property.
FAST = settings(
    max_examples=300,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

EDGE_U64 = st.sampled_from([0, 1, 2**31, 2**32, 2**62, 2**62 + 1, 2**63, 2**64 - 1])
U64 = st.one_of(EDGE_U64, st.integers(0, 2**64 - 1))
U32 = st.integers(0, 2**32 - 1)
KEYS = st.one_of(
    st.binary(max_size=8),
    st.sampled_from([b"", b"\xc3\x28", b"k" * 1025, b"k" * 1100, b"ok/\x00"]),
    st.text(max_size=20).map(lambda t: t.encode("utf-8", "surrogatepass")),
)
DTYPES = st.one_of(
    st.sampled_from(["|u1", "<f4", "<f8", "|b1", "<c16", "|O", "f4", "<i4,<i4", "|V8", "<U4", ""]),
    st.text(max_size=12),
)


# ------------------------------------------------------------------- keys
@FAST
@given(st.text(max_size=1100))
def test_encode_key_accepts_exactly_1_to_1024_utf8_bytes(key):
    try:
        raw = key.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates
        with pytest.raises(InvalidArgument, match="UTF-8"):
            encode_key(key)
        return
    if 1 <= len(raw) <= MAX_KEY_BYTES:
        assert encode_key(key) == raw
        assert check_key_bytes(raw, limit=MAX_KEY_BYTES) == key
    else:
        with pytest.raises(InvalidArgument, match=r"empty|limit"):
            encode_key(key)


@FAST
@given(st.binary(max_size=1100))
def test_check_key_bytes_says_what_is_wrong(raw):
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if raw and len(raw) <= MAX_KEY_BYTES and text is not None:
        assert check_key_bytes(raw, limit=MAX_KEY_BYTES, field="k") == text
        return
    with pytest.raises(InvalidArgument) as err:
        check_key_bytes(raw, limit=MAX_KEY_BYTES, field="entries[3].key")
    assert str(err.value).startswith("entries[3].key ")


@FAST
@given(st.one_of(st.integers(), st.binary(max_size=4), st.none(), st.lists(st.text(), max_size=2)))
def test_a_key_that_is_not_a_str_is_invalid(key):
    with pytest.raises(InvalidArgument, match="must be a str"):
        encode_key(key)


# --------------------------------------------------------------- headers
REQUEST_TYPES = [
    pb.PutRequest,
    pb.GetRequest,
    pb.DeleteRequest,
    pb.FillRequest,
    pb.FenceRequest,
    pb.StatRequest,
]


@FAST
@given(st.sampled_from(REQUEST_TYPES), st.binary(max_size=256))
def test_parse_header_returns_a_message_or_invalid_argument(cls, raw):
    try:
        msg = parse_header(cls, raw, "op")
    except InvalidArgument as exc:
        assert f"not a valid {cls.__name__}" in str(exc)
    else:
        assert isinstance(msg, cls)


@FAST
@given(DTYPES, st.lists(U64, max_size=4), st.sampled_from(["C", "F", "", "X"]), U64)
def test_check_layout_raises_only_invalid_argument(dtype, shape, order, nbytes):
    try:
        layout = codec.check_layout(dtype, shape, order, nbytes)
    except InvalidArgument:
        return
    assert layout is not None


# ------------------------------------------------------------ data framing
@FAST
@given(
    st.lists(
        st.one_of(
            st.tuples(st.integers(0, 255), st.binary(max_size=300)).map(
                lambda t: FRAME.pack(t[0], len(t[1])) + t[1]
            ),
            st.tuples(st.integers(0, 255), st.sampled_from([MAX_HEADER + 1, 2**32 - 1])).map(
                lambda t: FRAME.pack(*t)
            ),
            st.binary(max_size=9),
        ),
        max_size=6,
    )
)
def test_reader_yields_frames_or_a_typed_error(pieces):
    """Whatever arrives, read_frame gives frames that are a prefix of the stream,
    then None (clean end), PeerClosed (cut mid-frame) or ProtocolError (over the limit)."""
    a, b = socket.socketpair()
    try:
        _read_all_frames(a, b, b"".join(pieces))
    finally:
        a.close()
        b.close()


def _read_all_frames(a: socket.socket, b: socket.socket, stream: bytes) -> None:
    def send() -> None:
        with contextlib.suppress(OSError):
            a.sendall(stream)
            a.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=send)
    sender.start()
    b.settimeout(10)
    reader = Reader(b, size=128)  # small: headers cross the buffer's edge
    rebuilt = b""
    try:
        for _ in range(len(stream) + 1):  # each frame takes >= 5 bytes: bounded
            got = reader.read_frame()
            if got is None:
                assert rebuilt == stream
                break
            code, header = got
            rebuilt += FRAME.pack(code, len(header)) + header
            assert stream.startswith(rebuilt)
    except ProtocolError as exc:
        assert "exceeds" in str(exc)
    except PeerClosed as exc:
        assert "closed after" in str(exc)
    b.shutdown(socket.SHUT_RD)  # a sender blocked on a full buffer gets an error, not a hang
    sender.join(10)
    assert not sender.is_alive()


# ------------------------------------------------------------- NodeOps
def _ops() -> NodeOps:
    rings = RingView("n1")
    return NodeOps(
        Store(1 << 22, stale=rings.stale, judge=rings),
        "n1",
        "n1",
        EpochView(),
        rings=rings,
        rereplicate=False,
    )


RESIDENT = b"resident/0"
RESIDENT_BYTES = bytes(range(200))


def _store_resident(ops: NodeOps) -> None:
    meta = pb.TensorMeta(
        dtype="|u1", shape=[200], order="C", nbytes=200, crc32c=codec.crc32c(RESIDENT_BYTES)
    )
    plan = ops.plan_put(pb.PutRequest(entries=[pb.EntryPut(key=RESIDENT, meta=meta)]))
    try:
        ops.finish_put(plan, [(RESIDENT_BYTES,)], [codec.crc32c(RESIDENT_BYTES)])
    finally:
        ops.abort_put(plan)


def _resident_intact(ops: NodeOps) -> bool:
    reply, entries, _ = ops.get(pb.GetRequest(keys=[pb.EntryKey(key=RESIDENT)]))
    got = reply.entries[0]
    return got.found and b"".join(bytes(c) for c in entries[0].chunks) == RESIDENT_BYTES


stripes = st.lists(st.tuples(KEYS, U64, U64), max_size=3)
entries = st.builds(
    lambda key, kind, dtype, shape, order, nbytes, crc, strp, version, stamp, if_v: pb.EntryPut(
        key=key,
        kind=kind,
        meta=pb.TensorMeta(
            dtype=dtype,
            shape=shape,
            order=order,
            nbytes=nbytes,
            crc32c=crc,
            stripes=[pb.StripeRef(key=k, offset=o, nbytes=n) for k, o, n in strp],
        ),
        version=version,
        stamp=stamp,
        **({} if if_v is None else {"if_version": if_v}),
    ),
    KEYS,
    st.sampled_from([0, 0, 0, 1, 2, 99]),
    DTYPES,
    st.lists(st.one_of(st.integers(0, 300), U64), max_size=3),
    st.sampled_from(["C", "F", "X"]),
    st.one_of(st.integers(0, 300), U64),
    U32,
    stripes,
    st.one_of(st.just(0), U64),
    st.one_of(st.just(0), U64),
    st.one_of(st.none(), U64),
)

# Well-formed but for the values that only matter after validation: versions,
# stamps and conditions at their edges (a version at 2**64-1 once left the
# node with no next version: every later write failed).
well_formed = st.builds(
    lambda key, n, version, stamp, if_v: pb.EntryPut(
        key=key,
        meta=pb.TensorMeta(
            dtype="|u1", shape=[n], order="C", nbytes=n, crc32c=codec.crc32c(bytes(n))
        ),
        version=version,
        stamp=stamp,
        **({} if if_v is None else {"if_version": if_v}),
    ),
    st.sampled_from([b"a", b"b", b"dir/c"]),
    st.integers(0, 64),
    st.one_of(st.just(0), EDGE_U64, U64),
    st.one_of(st.just(0), EDGE_U64, U64),
    st.one_of(st.none(), EDGE_U64, U64),
)


@FAST
@given(
    st.lists(st.one_of(entries, well_formed), max_size=4),
    st.one_of(st.just(0), U64),
    st.randoms(),
)
@example(  # the version-overflow regression, whatever hypothesis draws
    [
        pb.EntryPut(
            key=b"a",
            meta=pb.TensorMeta(dtype="|u1", shape=[0], order="C", crc32c=codec.crc32c(b"")),
            version=2**64 - 1,
        )
    ],
    0,
    random.Random(0),
)
def test_any_put_header_releases_its_reservation_and_harms_nothing(batch, epoch, rnd):
    ops = _ops()
    _store_resident(ops)
    req = pb.PutRequest(epoch=epoch, entries=batch)
    try:
        plan = ops.plan_put(req)
    except TensorCacheError:
        assert ops.store.stats().bytes_reserved == 0
    else:
        try:
            # The payload the header asks for (zeros: what well_formed's checksums
            # are of), or a byte short for the last entry.
            payload = [bytes(n) for n in plan.sizes if n <= 4096]
            if len(payload) == len(plan.sizes):
                if payload and rnd.random() < 0.3:
                    payload[-1] = payload[-1][:-1]
                chunks, crcs = split_payload(payload, plan.sizes)
                ops.finish_put(plan, chunks, crcs)
        except TensorCacheError:
            pass
        finally:
            ops.abort_put(plan)
        assert ops.store.stats().bytes_reserved == 0
    assert _resident_intact(ops)
    # The node still takes the next well-formed write.
    ok = pb.EntryPut(
        key=b"after",
        meta=pb.TensorMeta(dtype="|u1", shape=[1], order="C", nbytes=1, crc32c=codec.crc32c(b"x")),
    )
    plan = ops.plan_put(pb.PutRequest(entries=[ok]))
    try:
        ops.finish_put(plan, [(b"x",)], [codec.crc32c(b"x")])
    finally:
        ops.abort_put(plan)


@FAST
@given(
    st.lists(st.tuples(KEYS, st.sampled_from([0, 1, 7])), max_size=4),
    st.booleans(),
    st.booleans(),
    st.booleans(),
)
def test_any_get_header_answers_or_is_invalid(keys, head_only, local, handoff):
    ops = _ops()
    _store_resident(ops)
    req = pb.GetRequest(
        keys=[pb.EntryKey(key=k, kind=kind) for k, kind in keys],  # type: ignore[misc]
        head_only=head_only,
        local=local,
        handoff=handoff,
    )
    try:
        reply, _, _ = ops.get(req, local_ok=local)
    except InvalidArgument as exc:
        assert "key" in str(exc) or "kind" in str(exc) or "keys" in str(exc)
    else:
        assert len(reply.entries) == len(keys)
    assert _resident_intact(ops)


# ------------------------------------------- data channel: DELETE and FILL
@pytest.fixture(scope="module")
def control_conn():
    """One node's data server in-process and one connection to it, kept across examples:
    after every request, whatever it held, the stream must still be in step."""
    from tensorcache.node.dataserver import DataServer

    ops = _ops()
    _store_resident(ops)
    server = DataServer(ops, "127.0.0.1", 0).start()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(MAGIC)
    try:
        yield sock, Reader(sock)
    finally:
        sock.close()
        server.stop()


CONTROL_STATUSES = {
    grpc.StatusCode.INVALID_ARGUMENT.value[0],
    grpc.StatusCode.FAILED_PRECONDITION.value[0],
}


@FAST
@given(
    st.sampled_from([OP_DELETE, OP_FILL]),
    st.one_of(
        st.binary(max_size=40),
        st.builds(
            lambda epoch, keys: pb.DeleteRequest(
                epoch=epoch,
                keys=[pb.EntryKey(key=k, kind=kind) for k, kind in keys],  # type: ignore[misc]
            ).SerializeToString(),
            st.one_of(st.just(0), U64),
            st.lists(
                st.tuples(KEYS.filter(lambda k: k != RESIDENT), st.sampled_from([0, 1, 7])),
                max_size=4,
            ),
        ),
        st.builds(
            lambda key, holder, filler, ttl, release: pb.FillRequest(
                key=key, holder=holder, filler=filler, ttl_ms=ttl, release=release
            ).SerializeToString(),
            KEYS,
            st.text(max_size=130),
            st.text(max_size=260),
            U32,
            st.booleans(),
        ),
    ),
)
def test_any_control_frame_answers_or_is_invalid_and_keeps_the_connection(control_conn, op, header):
    sock, reader = control_conn
    head = pb.GetRequest(keys=[pb.EntryKey(key=RESIDENT)], head_only=True).SerializeToString()
    sock.sendall(FRAME.pack(op, len(header)) + header + FRAME.pack(OP_GET, len(head)) + head)
    got = reader.read_frame()
    assert got is not None
    status, body = got
    if status == 0:
        (pb.DeleteReply if op == OP_DELETE else pb.FillReply).FromString(body)
    else:
        assert status in CONTROL_STATUSES
        err = pb.DataError.FromString(body)
        assert err.code == status and err.message
    got = reader.read_frame()  # the version check right behind it: answered, resident intact
    assert got is not None and got[0] == 0
    assert pb.GetReply.FromString(got[1]).entries[0].found
