"""A bounded, seeded fuzzer for what a node reads off the wire.

Two doors into a node take bytes from anyone who can reach it: the TCP data
channel (``tensorcache/dataproto.py`` framing, ``node/dataserver.py``: PUT,
GET, RELEASE, and the control-size DELETE and FILL) and
the gRPC methods whose headers the node parses itself (``node/service.py``).
A *case* is what one client sends on one fresh connection; cases start from
well-formed seeds and get a few mutations each: byte flips and interesting
bytes, frame lengths set to edge values, truncation and splices, and edits
that keep the protobuf header parseable but put odd values in it (huge sizes,
unknown dtypes and kinds, bad keys, stripes that do not add up), because
random bytes alone rarely get past the parser to the checks behind it.

``replay`` sends a case and judges the node's answer on its own:

- data channel: every reply frame is status 0 or a ``DataError`` whose code
  is one the node's error mapping produces and whose message is not empty,
  and the node closes the connection within ``REPLY_TIMEOUT_S`` once we stop
  sending (so a half-sent frame cannot hold a thread forever);
- gRPC: the status is one the node's error mapping produces: never UNKNOWN
  or INTERNAL (an exception nobody mapped) and never a deadline (a hang).

What one case cannot show is checked by the caller between cases (the test
in test_fuzz_wire.py): the node is alive, holds no reservation, lost nothing
stored before, and wrote no traceback to its log.

Longer runs, saving what fails as new corpus lines:
``python -m tests.integration.fuzzwire --seconds 600 --seed 7 --save found.jsonl``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from tensorcache import codec
from tensorcache.dataproto import (
    FRAME,
    MAGIC,
    MAX_HEADER,
    OP_DELETE,
    OP_FILL,
    OP_GET,
    OP_PUT,
    OP_RELEASE,
)
from tensorcache.grpcutil import NODE_SERVICE
from tensorcache.proto import tensorcache_pb2 as pb

CORPUS = Path(__file__).with_name("fuzz_corpus.jsonl")
REPLY_TIMEOUT_S = 10.0
KEY_PREFIX = b"fuzz/"

# The statuses node/service.py and node/dataserver.py answer (errors.py
# _STATUS_OF); anything else means an exception escaped the mapping.
EXPECTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DATA_LOSS,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
}
EXPECTED_NUMBERS = {code.value[0] for code in EXPECTED}
GRPC_METHODS = ("Put", "Get", "Delete", "Stat", "Fill", "Fence")


@dataclass(frozen=True)
class Case:
    """What one connection sends: the data channel's byte stream, or a gRPC call's messages."""

    channel: str  # "data" or "grpc"
    method: str  # gRPC method name; "" for the data channel
    messages: tuple[bytes, ...]
    name: str = ""
    why: str = ""
    #: Corpus cases: the outcome ``replay`` must give, and words the first
    #: error message must contain (the field it names).
    expect: str = ""
    detail: str = ""

    def to_json(self) -> str:
        return json.dumps(
            {
                "name": self.name,
                "why": self.why,
                "channel": self.channel,
                "method": self.method,
                "expect": self.expect,
                "detail": self.detail,
                "hex": [m.hex() for m in self.messages],
            }
        )

    @staticmethod
    def from_json(line: str) -> Case:
        d = json.loads(line)
        return Case(
            d["channel"],
            d["method"],
            tuple(bytes.fromhex(h) for h in d["hex"]),
            d.get("name", ""),
            d.get("why", ""),
            d.get("expect", ""),
            d.get("detail", ""),
        )


def load_corpus(path: Path = CORPUS) -> list[Case]:
    lines = path.read_text().splitlines()
    return [Case.from_json(line) for line in lines if line.strip() and not line.startswith("#")]


# ------------------------------------------------------------------- seeds
def _tensor_put(keys: list[bytes], payload: bytes, epoch: int = 0) -> pb.PutRequest:
    req = pb.PutRequest(epoch=epoch)
    for key in keys:
        meta = pb.TensorMeta(
            dtype="|u1",
            shape=[len(payload)],
            order="C",
            nbytes=len(payload),
            crc32c=codec.crc32c(payload),
        )
        req.entries.add(key=key, meta=meta)
    return req


def _manifest_put(key: bytes, nbytes: int) -> pb.PutRequest:
    half = nbytes // 2
    meta = pb.TensorMeta(dtype="|u1", shape=[nbytes], order="C", nbytes=nbytes, put_id=1)
    for i, (off, n) in enumerate([(0, half), (half, nbytes - half)]):
        meta.stripes.add(key=key + b"\x00%016x\x00%d" % (1, i), offset=off, nbytes=n)
    return pb.PutRequest(entries=[pb.EntryPut(key=key, meta=meta)])


def _frame(op: int, header: bytes) -> bytes:
    return FRAME.pack(op, len(header)) + header


def seeds() -> list[Case]:
    """Well-formed requests, the starting points of every mutation."""
    small = bytes(range(256))
    k = KEY_PREFIX
    put1 = _tensor_put([k + b"a"], small).SerializeToString()
    put3 = _tensor_put([k + b"b", k + b"c", k + b"d"], small[:16]).SerializeToString()
    get = pb.GetRequest(keys=[pb.EntryKey(key=k + b"a"), pb.EntryKey(key=k + b"zz")])
    head = pb.GetRequest(keys=[pb.EntryKey(key=k + b"a")], head_only=True)
    manifest = _manifest_put(k + b"m", 300).SerializeToString()
    delete = pb.DeleteRequest(keys=[pb.EntryKey(key=k + b"gone"), pb.EntryKey(key=k + b"d")])
    fill = pb.FillRequest(key=k + b"f", holder="h", ttl_ms=1000, filler="fuzz")
    release = pb.FillRequest(key=k + b"f", holder="h", release=True)
    data = [
        MAGIC + _frame(OP_PUT, put1) + small,
        MAGIC + _frame(OP_PUT, put3) + small[:16] * 3,
        MAGIC + _frame(OP_GET, get.SerializeToString()),
        MAGIC + _frame(OP_GET, head.SerializeToString()) + _frame(OP_RELEASE, b""),
        MAGIC + _frame(OP_PUT, manifest),
        MAGIC + _frame(OP_PUT, put1) + small + _frame(OP_GET, get.SerializeToString()),
        # Control-size ops: a delete, a fill and its release, then a version check.
        MAGIC + _frame(OP_DELETE, delete.SerializeToString()),
        MAGIC
        + _frame(OP_FILL, fill.SerializeToString())
        + _frame(OP_FILL, release.SerializeToString())
        + _frame(OP_GET, head.SerializeToString()),
    ]
    cases = [Case("data", "", (d,), f"seed-data-{i}") for i, d in enumerate(data)]
    grpc_seeds = [
        ("Put", (put1, small[:100], small[100:])),
        ("Put", (put3, small[:48])),
        ("Put", (manifest,)),
        ("Get", (get.SerializeToString(),)),
        ("Get", (head.SerializeToString(),)),
        ("Delete", (pb.DeleteRequest(keys=[pb.EntryKey(key=k + b"gone")]).SerializeToString(),)),
        ("Stat", (pb.StatRequest().SerializeToString(),)),
        ("Fill", (pb.FillRequest(key=k + b"f", holder="h", ttl_ms=1000).SerializeToString(),)),
        ("Fence", (pb.FenceRequest(epoch=0).SerializeToString(),)),
    ]
    cases += [Case("grpc", m, msgs, f"seed-grpc-{m}-{i}") for i, (m, msgs) in enumerate(grpc_seeds)]
    return cases


# --------------------------------------------------------------- mutations
INTERESTING_U32 = [
    0,
    1,
    2,
    3,
    4,
    7,
    8,
    255,
    256,
    4095,
    65535,
    MAX_HEADER,
    MAX_HEADER + 1,
    2**31,
    2**32 - 1,
]
INTERESTING_U64 = [0, 1, 2**31, 2**32, 2**40, 2**62, 2**63 - 1, 2**63, 2**64 - 1]
DTYPES = [
    "|u1",
    "<f4",
    "|O",
    "<q9",
    "",
    ",",
    "(",
    "i4,",
    "f4",
    "<i4,<i4",
    "|V8",
    "<U4",
    "|b1",
    "\x00",
    "<f" + "9" * 40,
]


def _flip(rng: random.Random, b: bytearray) -> None:
    if b:
        i = rng.randrange(len(b))
        b[i] ^= 1 << rng.randrange(8)


def _set_byte(rng: random.Random, b: bytearray) -> None:
    if b:
        b[rng.randrange(len(b))] = rng.choice([0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)])


def _truncate(rng: random.Random, b: bytearray) -> None:
    if b:
        del b[rng.randrange(len(b)) :]


def _insert(rng: random.Random, b: bytearray) -> None:
    at = rng.randrange(len(b) + 1)
    b[at:at] = rng.randbytes(rng.choice([1, 2, 4, 9, 64]))


def _duplicate(rng: random.Random, b: bytearray) -> None:
    if b:
        i = rng.randrange(len(b))
        j = min(len(b), i + rng.randrange(1, 64))
        b[j:j] = b[i:j]


BYTE_MUTATIONS = [_flip, _set_byte, _truncate, _insert, _duplicate]


def _frame_offsets(stream: bytes) -> list[int]:
    """Where each frame of a (seed) data stream starts, walking headers and payloads."""
    out, pos = [], len(MAGIC)
    while pos + FRAME.size <= len(stream):
        out.append(pos)
        op, n = FRAME.unpack_from(stream, pos)
        header = stream[pos + FRAME.size : pos + FRAME.size + n]
        pos += FRAME.size + n
        if op == OP_PUT:
            with contextlib.suppress(Exception):
                req = pb.PutRequest.FromString(header)
                pos += sum(e.meta.nbytes for e in req.entries if not e.meta.stripes)
    return out


def _mutate_frame_field(rng: random.Random, b: bytearray) -> None:
    """Set a frame's op or length to an edge value."""
    offsets = _frame_offsets(bytes(b))
    if not offsets:
        return _flip(rng, b)
    at = rng.choice(offsets)
    if rng.random() < 0.3:
        b[at] = rng.choice([0, OP_PUT, OP_GET, OP_RELEASE, 4, OP_DELETE, OP_FILL, 7, 255])
    else:
        b[at + 1 : at + 5] = rng.choice(INTERESTING_U32).to_bytes(4, "little")
    return None


def _mutate_control(rng: random.Random, msg: pb.DeleteRequest | pb.FillRequest) -> None:
    """Odd values in a delete's or fill's fields (the header stays parseable)."""
    choice = rng.randrange(4)
    if choice == 0:
        msg.epoch = rng.choice(INTERESTING_U64)
    elif isinstance(msg, pb.DeleteRequest):
        if choice == 1 and msg.keys:
            msg.keys[0].key = rng.choice([b"", b"\xff\xfe", b"x" * 1025, KEY_PREFIX + b"\x00"])
        elif choice == 2 and msg.keys:
            msg.keys[-1].kind = rng.choice([1, 2, 7, 2**31 - 1, -1])  # type: ignore[assignment]
        else:
            for _ in range(rng.choice([0, 1000, 20000])):
                msg.keys.add(key=KEY_PREFIX + b"many")
    elif choice == 1:
        msg.key = rng.choice([b"", b"\xc3\x28", b"k" * 1025, KEY_PREFIX + b"\x00"])
    elif choice == 2:
        msg.holder = rng.choice(["", "h" * 129, "\x00", "h"])
        msg.filler = rng.choice(["", "f" * 257, "ok"])
    else:
        msg.ttl_ms = rng.choice([0, 1, 2**31, 2**32 - 1])
        msg.release = rng.random() < 0.3


def _mutate_message(rng: random.Random, msg: pb.PutRequest | pb.GetRequest) -> None:
    """Keep the header parseable; put an odd value in one of its fields."""
    if isinstance(msg, pb.GetRequest):
        choice = rng.randrange(5)
        if choice == 0 and msg.keys:
            msg.keys[0].key = rng.choice([b"", b"\xff\xfe", b"x" * 1025, KEY_PREFIX + b"\x00"])
        elif choice == 1 and msg.keys:
            msg.keys[0].kind = rng.choice([1, 2, 7, 2**31 - 1, -1])  # type: ignore[assignment]
        elif choice == 2:
            msg.epoch = rng.choice(INTERESTING_U64)
        elif choice == 3:
            msg.head_only, msg.local, msg.handoff = (rng.random() < 0.5 for _ in range(3))
        else:
            for _ in range(rng.choice([0, 1000, 70000])):
                msg.keys.add(key=KEY_PREFIX + b"many")
        return
    if not msg.entries:
        return
    e = msg.entries[rng.randrange(len(msg.entries))]
    choice = rng.randrange(10)
    if choice == 0:
        e.meta.nbytes = rng.choice(INTERESTING_U64)
    elif choice == 1:
        del e.meta.shape[:]
        e.meta.shape.extend(rng.choice([[], [0], [2**32, 2**31], [2**64 - 1], [1] * 64, [3, 0, 5]]))
    elif choice == 2:
        e.meta.dtype = rng.choice(DTYPES)
    elif choice == 3:
        e.meta.order = rng.choice(["", "X", "F", "CF", "c"])
    elif choice == 4:
        e.kind = rng.choice([1, 2, 99, 2**31 - 1])  # type: ignore[assignment]
    elif choice == 5:
        e.key = rng.choice([b"", b"\xc3\x28", b"k" * 1025, b"k" * 1100, KEY_PREFIX + b"\x00\x00"])
    elif choice == 6 and e.meta.stripes:
        s = e.meta.stripes[rng.randrange(len(e.meta.stripes))]
        s.offset, s.nbytes = rng.choice(INTERESTING_U64), rng.choice(INTERESTING_U64)
    elif choice == 7:
        e.version = rng.choice(INTERESTING_U64[1:])
        if rng.random() < 0.5:
            e.if_version = rng.choice(INTERESTING_U64)
    elif choice == 8:
        e.meta.crc32c ^= 1
    else:
        msg.epoch = rng.choice(INTERESTING_U64)


def _mutate_structured(rng: random.Random, case: Case) -> Case | None:
    """Parse the case's header, mutate a field, re-serialize it (lengths stay right)."""
    if case.channel == "grpc":
        cls = {
            "Put": pb.PutRequest,
            "Get": pb.GetRequest,
            "Delete": pb.DeleteRequest,
            "Fill": pb.FillRequest,
        }.get(case.method)
        if cls is None or not case.messages:
            return None
        try:
            msg = cls.FromString(case.messages[0])
        except Exception:
            return None
        if isinstance(msg, pb.DeleteRequest | pb.FillRequest):
            _mutate_control(rng, msg)
        else:
            _mutate_message(rng, msg)
        return Case(case.channel, case.method, (msg.SerializeToString(), *case.messages[1:]))
    stream = case.messages[0]
    offsets = _frame_offsets(stream)
    if not offsets:
        return None
    at = rng.choice(offsets)
    op, n = FRAME.unpack_from(stream, at)
    header = stream[at + FRAME.size : at + FRAME.size + n]
    cls = {
        OP_PUT: pb.PutRequest,
        OP_GET: pb.GetRequest,
        OP_DELETE: pb.DeleteRequest,
        OP_FILL: pb.FillRequest,
    }.get(op)
    if cls is None:
        return None
    try:
        msg = cls.FromString(header)
    except Exception:
        return None
    if isinstance(msg, pb.DeleteRequest | pb.FillRequest):
        _mutate_control(rng, msg)
    else:
        _mutate_message(rng, msg)
    new = msg.SerializeToString()
    out = stream[:at] + FRAME.pack(op, len(new)) + new + stream[at + FRAME.size + n :]
    return Case("data", "", (out,))


def mutate(rng: random.Random, case: Case, pool: list[Case]) -> Case:
    """One to four mutations of ``case`` (a splice takes the tail of another from ``pool``)."""
    for _ in range(rng.randint(1, 4)):
        r = rng.random()
        if r < 0.35:
            structured = _mutate_structured(rng, case)
            if structured is not None:
                case = structured
                continue
        msgs = [bytearray(m) for m in case.messages] or [bytearray()]
        i = rng.randrange(len(msgs))
        if case.channel == "data" and r < 0.55:
            _mutate_frame_field(rng, msgs[i])
        elif r < 0.62:
            other = rng.choice([c for c in pool if c.channel == case.channel] or [case])
            tail = other.messages[0] if other.messages else b""
            cut = rng.randrange(len(msgs[i]) + 1)
            msgs[i] = msgs[i][:cut] + tail[rng.randrange(len(tail) + 1) :]
        elif case.channel == "grpc" and r < 0.7:
            if rng.random() < 0.5 and len(msgs) > 1:
                del msgs[rng.randrange(len(msgs))]
            else:
                msgs.append(bytearray(rng.randbytes(rng.choice([0, 1, 100]))))
        else:
            rng.choice(BYTE_MUTATIONS)(rng, msgs[i])
        case = Case(case.channel, case.method, tuple(bytes(m) for m in msgs))
    return case


def generate(seed: int, count: int) -> Iterator[Case]:
    """``count`` mutated cases, the same ones for the same seed."""
    rng = random.Random(seed)
    pool = seeds()
    for n in range(count):
        case = mutate(rng, rng.choice(pool), pool)
        yield Case(case.channel, case.method, case.messages, f"seed{seed}-{n}")


# ---------------------------------------------------------------- oracles
class Finding(AssertionError):
    """The node answered a case in a way the wire contract does not allow."""


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _expected_replies(stream: bytes) -> list[tuple[int, bool]]:
    """(op, head_only) of each request of ``stream`` the node would answer, as far as it parses."""
    out: list[tuple[int, bool]] = []
    if not stream.startswith(MAGIC):
        return out
    pos = len(MAGIC)
    while pos + FRAME.size <= len(stream):
        op, n = FRAME.unpack_from(stream, pos)
        header = stream[pos + FRAME.size : pos + FRAME.size + n]
        pos += FRAME.size + n
        if op == OP_PUT:
            try:
                req = pb.PutRequest.FromString(header)
                pos += sum(e.meta.nbytes for e in req.entries if not e.meta.stripes)
            except Exception:
                pass
            out.append((op, False))
        elif op == OP_GET:
            try:
                head_only = pb.GetRequest.FromString(header).head_only
            except Exception:
                head_only = True
            out.append((op, head_only))
        elif op != OP_RELEASE:
            out.append((op, True))
    return out


def _recv_all(sock: socket.socket, deadline: float) -> bytes:
    buf = bytearray()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise Finding(f"no EOF within {REPLY_TIMEOUT_S} s after the client stopped sending")
        sock.settimeout(left)
        try:
            got = sock.recv(1 << 20)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return bytes(buf)
        if not got:
            return bytes(buf)
        buf += got


def _check_data_replies(stream: bytes, replies: bytes) -> tuple[list[int], str]:
    """Walk the reply frames; every error frame must be well formed.

    Returns the statuses and the first error's message ("" if none)."""
    expected = _expected_replies(stream)
    statuses: list[int] = []
    first_error = ""
    pos = 0
    while pos < len(replies):
        if pos + FRAME.size > len(replies):
            raise Finding(f"a reply frame is cut short at byte {pos} of {len(replies)}")
        status, n = FRAME.unpack_from(replies, pos)
        header = replies[pos + FRAME.size : pos + FRAME.size + n]
        if len(header) < n:
            raise Finding(f"reply header of {n} bytes cut short at byte {pos}")
        pos += FRAME.size + n
        statuses.append(status)
        op, head_only = expected.pop(0) if expected else (OP_PUT, True)
        if status != 0:
            if status not in EXPECTED_NUMBERS:
                raise Finding(f"error status {status} is not one the node's mapping produces")
            err = pb.DataError.FromString(header)
            if err.code != status or not err.message:
                raise Finding(f"malformed DataError (status {status}): {err}")
            first_error = first_error or err.message
            continue
        if op == OP_GET and not head_only:
            reply = pb.GetReply.FromString(header)
            pos += sum(
                e.meta.nbytes
                for e in reply.entries
                if e.found and not e.meta.stripes and not e.local
            )
    return statuses, first_error


def replay_data(address: str, case: Case) -> tuple[list[int], str]:
    """Send a data channel case on a fresh connection: the statuses the node
    answered and its first error message."""
    stream = b"".join(case.messages)
    with socket.create_connection(_split(address), timeout=REPLY_TIMEOUT_S) as sock:
        # The node may refuse and close before reading all of it: that is allowed.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError, TimeoutError):
            sock.sendall(stream)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)  # EOF: a half-sent frame must not hold the node
        replies = _recv_all(sock, time.monotonic() + REPLY_TIMEOUT_S)
    return _check_data_replies(stream, replies)


def replay_grpc(channel: grpc.Channel, case: Case) -> tuple[grpc.StatusCode, str]:
    """Call a node method with a case's raw messages: the status and message it answered."""
    path = f"/{NODE_SERVICE}/{case.method}"
    try:
        if case.method == "Put":
            channel.stream_unary(path)(iter(case.messages), timeout=REPLY_TIMEOUT_S)
        elif case.method == "Get":
            for _ in channel.unary_stream(path)(
                case.messages[0] if case.messages else b"", timeout=REPLY_TIMEOUT_S
            ):
                pass
        else:
            channel.unary_unary(path)(
                case.messages[0] if case.messages else b"", timeout=REPLY_TIMEOUT_S
            )
    except grpc.RpcError as exc:
        code = exc.code()
        if code not in EXPECTED:
            raise Finding(f"{case.method}: status {code} ({exc.details()})") from exc
        if not exc.details():
            raise Finding(f"{case.method}: status {code} without a message") from exc
        return code, exc.details() or ""
    return grpc.StatusCode.OK, ""


def replay(data: str, channel: grpc.Channel, case: Case) -> tuple[str, str]:
    """Replay one case at a node (its data address, a channel to its gRPC port).

    Returns the outcome ("3,0": the data channel's statuses, "closed": none;
    a status name for gRPC) and the first error message."""
    if case.channel == "data":
        statuses, message = replay_data(data, case)
        return ",".join(map(str, statuses)) or "closed", message
    code, message = replay_grpc(channel, case)
    return code.name, message


def reservations_released(channel: grpc.Channel, timeout: float = REPLY_TIMEOUT_S) -> None:
    """Wait (bounded) until the node holds no reservation: a refused put must release it."""
    stat = channel.unary_unary(
        f"/{NODE_SERVICE}/Stat",
        request_serializer=pb.StatRequest.SerializeToString,
        response_deserializer=pb.NodeStats.FromString,
    )
    deadline = time.monotonic() + timeout
    while True:
        reserved = stat(pb.StatRequest(), timeout=timeout).bytes_reserved
        if reserved == 0:
            return
        if time.monotonic() > deadline:
            raise Finding(f"{reserved} bytes still reserved {timeout} s after the case")
        time.sleep(0.02)


# ------------------------------------------------------------ longer runs
@dataclass
class Tally:
    cases: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)


def main(argv: list[str] | None = None) -> int:
    from tensorcache.apps.cluster import LocalCluster

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", type=Path, default=None, help="append failing cases here (jsonl)")
    args = p.parse_args(argv)
    tally = Tally()
    found = 0
    with LocalCluster(1, capacity="256MiB") as cluster:
        proc = next(iter(cluster.nodes.values()))
        ring = cluster.ring()
        data = ring.members[0].data_address
        deadline = time.monotonic() + args.seconds
        with grpc.insecure_channel(proc.address) as channel:
            for case in generate(args.seed, 10**9):
                if time.monotonic() > deadline:
                    break
                tally.cases += 1
                try:
                    outcome, _ = replay(data, channel, case)
                    tally.outcomes[outcome] = tally.outcomes.get(outcome, 0) + 1
                    if not proc.alive():
                        raise Finding("the node died")
                    reservations_released(channel)
                except (Finding, grpc.RpcError, OSError) as exc:
                    found += 1
                    print(f"FINDING {case.name}: {exc}", flush=True)
                    if args.save:
                        with args.save.open("a") as f:
                            f.write(case.to_json() + "\n")
                    if not proc.alive():
                        break
        log = proc.log_path.read_text(errors="replace")
    if "Traceback" in log:
        found += 1
        print(f"FINDING: the node logged a traceback; see {proc.log_path}")
    print(f"{tally.cases} cases, {found} findings; outcomes: {sorted(tally.outcomes.items())}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
