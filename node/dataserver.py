"""The node's TCP data channel: Put and Get without gRPC's copies.

One thread per connection (clients keep a few persistent connections per
node), bounded by ``max_connections``. Each request is handled by NodeOps,
exactly like the gRPC servicer; only the byte moving differs:

- PUT: each entry of at least ``SMALL`` bytes is received with ``recv_into``
  into its own buffer, which becomes the stored chunk (no further copy);
  runs of smaller entries are received together and sliced.
- GET: the reply header and every stored chunk go out in one ``sendmsg``
  scatter list.

- DELETE, FILL (and GET head_only, a version check): control-size requests
  that NodeOps answers exactly as it does the gRPC methods of that name,
  after the same authorization rules (node/authz.py); here they cost a
  quarter of a gRPC call (docs/performance.md).

A malformed frame, an unknown op, a bad magic or any error during a PUT is
answered with a DataError frame and the connection is closed (the stream
may hold payload we will not read); an error answering a GET, DELETE or FILL
keeps the connection.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time

from tensorcache import codec
from tensorcache.auth import Grant
from tensorcache.authgrpc import PolicyFile
from tensorcache.dataproto import (
    FRAME,
    MAGIC,
    MAX_AUTH_HEADER,
    MAX_HEADER,
    OP_AUTH,
    OP_DELETE,
    OP_FILL,
    OP_GET,
    OP_PUT,
    OP_RELEASE,
    PeerClosed,
    Reader,
    frame,
    kernel_timeouts,
    send_buffers,
)
from tensorcache.errors import (
    Cancelled,
    CapacityExceeded,
    InvalidArgument,
    ProtocolError,
    StaleEpoch,
    TensorCacheError,
    Unauthenticated,
    status_code,
)
from tensorcache.node.authz import check_delete, check_fill, check_get, check_put
from tensorcache.node.metrics import NoMetrics, Transfers, request_op
from tensorcache.node.ops import Buffer, NodeOps, PutPlan
from tensorcache.node.recvpool import RecvPool
from tensorcache.node.store import Entry
from tensorcache.node.validate import parse_header
from tensorcache.proto import tensorcache_pb2 as pb
from tensorcache.tickets import MAX_TICKET, OP_TICKET, TicketBook
from tensorcache.tls import ReloadingContext

log = logging.getLogger("tensorcache.node")

SMALL = 64 * 1024
HANDSHAKE_TIMEOUT_S = 10.0
IDLE_TIMEOUT_S = 300.0
# A refused put's payload up to this size is read and dropped to keep the
# connection; beyond it the connection is closed instead.
DRAIN_LIMIT = 64 * 1024 * 1024
SMALL_RUN = 4 * 1024 * 1024


def _error_frame(exc: TensorCacheError) -> bytes:
    epoch = exc.epoch if isinstance(exc, StaleEpoch) else 0
    code = status_code(exc).value[0]
    return frame(code, pb.DataError(code=code, message=str(exc), epoch=epoch).SerializeToString())


class DataServer:
    def __init__(
        self,
        ops: NodeOps,
        host: str,
        port: int,
        *,
        max_connections: int = 1024,
        tokens: PolicyFile | None = None,
        metrics: Transfers | None = None,
        tls: ReloadingContext | None = None,
        tickets: TicketBook | None = None,
        pool: RecvPool | None = None,
    ) -> None:
        """``tokens``: require an AUTH frame first and check every request's keys.
        ``tls``: mutual TLS on every connection (a client certificate required).
        ``tickets``: plaintext, but every connection opens with a ticket this
        node issued over mutual-TLS gRPC (tensorcache/tickets.py); with
        ``tokens``, the ticket's token grant applies (no AUTH frame).
        ``pool``: where large put payloads are received (node/recvpool.py:
        reused memory, no page faults); None: fresh memory each time."""
        if tls is not None and tickets is not None:
            raise ValueError("the data channel is either TLS or ticketed, not both")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((host, port))
        self._listener.listen(128)
        self.port: int = self._listener.getsockname()[1]
        self._ops = ops
        self._max = max_connections
        self._tokens = tokens
        self._tls = tls
        self._tickets = tickets
        self._pool = pool if pool is not None else RecvPool(0)
        self._conns: set[socket.socket] = set()
        # Each connection's entries pinned for a local reader (read at scrape time).
        self._pins: dict[socket.socket, list[Entry]] = {}
        self._metrics: Transfers = metrics if metrics is not None else NoMetrics()
        self._lock = threading.Lock()
        self._stopping = False
        self._thread = threading.Thread(target=self._accept_loop, name="data-accept", daemon=True)

    def start(self) -> DataServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            for c in list(self._conns):
                with contextlib.suppress(OSError):
                    c.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=5)

    def connections(self) -> int:
        with self._lock:
            return len(self._conns)

    def pinned_bytes(self) -> int:
        """Bytes of entries handed out by address and not yet released."""
        with self._lock:
            pins = [list(p) for p in self._pins.values()]  # list(): atomic under the GIL
        return sum(len(c) for p in pins for e in p for c in e.chunks)

    def _accept_loop(self) -> None:
        while not self._stopping:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                if self._stopping:
                    return
                log.exception("data channel accept failed")
                continue
            with self._lock:
                if len(self._conns) >= self._max:
                    with contextlib.suppress(OSError):
                        conn.sendall(
                            _error_frame(
                                Cancelled(
                                    f"node {self._ops.name} has {self._max} data connections; "
                                    "retry later"
                                )
                            )
                        )
                        conn.close()
                    continue
                self._conns.add(conn)
            threading.Thread(
                target=self._serve, args=(conn,), name="data-conn", daemon=True
            ).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            # Kernel receive timeouts (no per-call poll): a peer that says
            # nothing after connecting, or idles between requests, is dropped
            # so it cannot hold a connection slot forever.
            kernel_timeouts(conn, HANDSHAKE_TIMEOUT_S, send=False)
            if self._tls is not None:
                conn = self._handshake(conn)
            reader = Reader(conn)
            magic = reader.read_exact(len(MAGIC))
            if magic != MAGIC:
                raise InvalidArgument(
                    f"not a tensorcache data connection: expected magic {MAGIC!r}, got {magic!r}"
                )
            ticketed = self._tickets is not None
            grant: Grant | None = None  # the connection's, from its AUTH frame or ticket
            if ticketed:
                grant = self._admit(conn, reader)
            kernel_timeouts(conn, IDLE_TIMEOUT_S, send=False)
            # Entries whose addresses the last local GET handed out: kept
            # alive (pinned) until the client sends its next request.
            pinned: list[Entry] = []
            with self._lock:
                self._pins[conn] = pinned
            while True:
                # Until the AUTH frame, a stranger gets only a small header.
                unknown = self._tokens is not None and grant is None and not ticketed
                got = reader.read_frame(MAX_AUTH_HEADER if unknown else MAX_HEADER)
                pinned.clear()  # the client finished reading the last local reply
                if got is None:
                    return
                op, header = got
                if op == OP_AUTH:
                    if ticketed:  # a token in plaintext: refuse rather than use it
                        raise Unauthenticated(
                            "data channel: this node's data channel is plaintext and takes a "
                            "ticket, never a token (it would cross the network in the clear)"
                        )
                    grant = self._authenticate(header)
                    continue
                if self._tokens is not None and grant is None:
                    raise Unauthenticated(
                        "data channel: this node requires a token (an AUTH frame first)"
                    )
                if op == OP_GET:
                    pinned.extend(self._get(conn, header, grant))
                elif op == OP_PUT:
                    self._put(conn, reader, header, grant)
                elif op == OP_RELEASE:
                    pass  # unpinned above; no reply
                elif op in (OP_DELETE, OP_FILL):
                    self._control(conn, op, header, grant)
                else:
                    raise InvalidArgument(f"unknown data channel op {op}")
        except (PeerClosed, OSError):
            return  # the client went away or idled out; a put in flight was released
        except ProtocolError as exc:
            self._fail(conn, InvalidArgument(str(exc)))
        except TensorCacheError as exc:
            self._fail(conn, exc)
        except Exception:
            log.exception("data channel connection failed")
        finally:
            with self._lock:
                self._conns.discard(conn)
                self._pins.pop(conn, None)
            with contextlib.suppress(OSError):
                conn.close()

    def _handshake(self, raw: socket.socket) -> socket.socket:
        """TLS server handshake (bounded by the kernel timeout set before it)."""
        assert self._tls is not None
        with self._lock:  # the wrapped socket takes over the file descriptor
            self._conns.discard(raw)
        try:
            conn = self._tls.get().wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            log.info("data channel: TLS handshake refused: %s", exc)
            raise
        with self._lock:
            self._conns.add(conn)
        return conn

    def _admit(self, conn: socket.socket, reader: Reader) -> Grant | None:
        """A ticketed connection's first frame: its ticket, checked (refused: raises)."""
        assert self._tickets is not None
        got = reader.read_frame(MAX_TICKET)
        if got is None:
            raise PeerClosed("closed before its ticket")
        op, header = got
        if op != OP_TICKET:
            raise Unauthenticated(
                "data channel: this node's data channel is plaintext and needs a ticket "
                "(DataTickets/Issue over mutual-TLS gRPC) as the first frame"
            )
        peer = conn.getpeername()
        grants = self._tokens.policy().grants.values() if self._tokens is not None else None
        try:
            grant, identity = self._tickets.admit(header, peer[0], peer[1], grants)
        except Unauthenticated as exc:
            log.info("data channel: refused %s:%s: %s", peer[0], peer[1], exc)
            raise
        log.debug("data channel: ticket of %s admitted from %s:%s", identity, peer[0], peer[1])
        return grant

    def _authenticate(self, header: bytes) -> Grant | None:
        """The grant of an AUTH frame's token (None: this node checks no tokens)."""
        if self._tokens is None:
            return None
        try:
            token = header.decode("utf-8")
        except UnicodeDecodeError:
            raise Unauthenticated("data channel: the token is not UTF-8") from None
        return self._tokens.authenticate(token)

    @staticmethod
    def _fail(conn: socket.socket, exc: TensorCacheError) -> None:
        with contextlib.suppress(OSError):
            conn.sendall(_error_frame(exc))

    def _get(self, conn: socket.socket, header: bytes, grant: Grant | None) -> list[Entry]:
        start = time.perf_counter()
        op = "get"
        try:
            req: pb.GetRequest = parse_header(pb.GetRequest, header, "get")
            op = request_op(req)
            if grant is not None:
                check_get(grant, req)
            reply, entries, pinned = self._ops.get(req, local_ok=True)
        except TensorCacheError as exc:
            conn.sendall(_error_frame(exc))  # the stream is still in step: keep it
            self._metrics.done(
                op, "data", status_code(exc).name, time.perf_counter() - start, 0, 0, 0
            )
            return []
        head = reply.SerializeToString()
        buffers: list[Buffer] = [FRAME.pack(0, len(head)), head]
        sent = 0
        if not req.head_only:
            for entry in entries:
                buffers.extend(entry.chunks)
            sent = sum(map(len, buffers)) - len(buffers[0]) - len(head)
        if sent + len(head) <= SMALL:
            # A small reply (a version check, a 4 KiB get): one joined copy
            # and sendall cost less than a scatter list of casted views (#18).
            conn.sendall(b"".join(buffers))
        else:
            send_buffers(conn, buffers)
        local = sum(len(c) for e in pinned for c in e.chunks) if pinned else 0
        self._metrics.done(op, "data", "OK", time.perf_counter() - start, 0, sent, local)
        return pinned

    def _control(self, conn: socket.socket, op: int, header: bytes, grant: Grant | None) -> None:
        """A DELETE or FILL: the gRPC method's header and checks, answered in one frame.

        No payload follows these requests, so an error leaves the stream in
        step and the connection open (as for GET).
        """
        start = time.perf_counter()
        name = "delete" if op == OP_DELETE else "fill"
        try:
            reply: pb.DeleteReply | pb.FillReply
            if op == OP_DELETE:
                dreq: pb.DeleteRequest = parse_header(pb.DeleteRequest, header, "delete")
                if grant is not None:
                    check_delete(grant, dreq)
                reply = self._ops.delete(dreq)
            else:
                freq: pb.FillRequest = parse_header(pb.FillRequest, header, "fill")
                if grant is not None:
                    check_fill(grant, freq)
                reply = self._ops.fill(freq)
        except TensorCacheError as exc:
            conn.sendall(_error_frame(exc))
            status = status_code(exc).name
        else:
            conn.sendall(frame(0, reply.SerializeToString()))
            status = "OK"
        self._metrics.done(name, "data", status, time.perf_counter() - start, 0, 0, 0)

    def _put(self, conn: socket.socket, reader: Reader, header: bytes, grant: Grant | None) -> None:
        start = time.perf_counter()
        status, received = "UNKNOWN", 0
        try:
            status, received = self._put_one(conn, reader, header, grant)
        except TensorCacheError as exc:
            status = status_code(exc).name
            raise
        except ProtocolError:
            status = "INVALID_ARGUMENT"
            raise
        except (PeerClosed, OSError):
            status = "CANCELLED"
            raise
        finally:
            self._metrics.done("put", "data", status, time.perf_counter() - start, received, 0, 0)

    def _put_one(
        self, conn: socket.socket, reader: Reader, header: bytes, grant: Grant | None
    ) -> tuple[str, int]:
        """One put: (its status, the payload bytes it stored); a refusal is answered here."""
        req: pb.PutRequest = parse_header(pb.PutRequest, header, "put")
        if grant is not None:
            check_put(grant, req)  # refused: the connection closes (payload unread)
        try:
            plan: PutPlan = self._ops.plan_put(req)
        except (CapacityExceeded, StaleEpoch) as exc:
            # Refused before reading the payload, with a header that is valid
            # (so its sizes can be trusted): answer, then skip the payload the
            # client is sending, and the connection stays in step. Too much to
            # skip: raise, and the connection closes (the client reads our
            # answer after its send fails). Invalid headers always close.
            declared = sum(e.meta.nbytes for e in req.entries if not e.meta.stripes)
            if declared > DRAIN_LIMIT:
                raise
            conn.sendall(_error_frame(exc))
            reader.discard(declared)
            return status_code(exc).name, 0
        try:
            chunks, crcs = self._receive(reader, plan.sizes)
            reply = self._ops.finish_put(plan, chunks, crcs)
        finally:
            self._ops.abort_put(plan)
        conn.sendall(frame(0, reply.SerializeToString()))
        return "OK", plan.total

    def _receive(
        self, reader: Reader, sizes: list[int]
    ) -> tuple[list[tuple[Buffer, ...]], list[int]]:
        """Receive each entry's bytes into buffers that become the stored chunks."""
        chunks: list[tuple[Buffer, ...]] = []
        crcs: list[int] = []
        i = 0
        while i < len(sizes):
            n = sizes[i]
            if n == 0:
                chunks.append(())
                crcs.append(0)
                i += 1
            elif n >= SMALL:
                # Reused memory when the pool has it (no page faults), else
                # np.empty, not bytearray(n): no zero-fill pass before the
                # receive overwrites every byte anyway.
                buf = self._pool.take(n)
                crcs.append(reader.read_into(memoryview(buf)))
                chunks.append((buf,))
                i += 1
            else:  # a run of small entries: one receive, then slices
                j, run = i, 0
                while j < len(sizes) and 0 < sizes[j] < SMALL and run + sizes[j] <= SMALL_RUN:
                    run += sizes[j]
                    j += 1
                run_buf = bytearray(run)
                view = memoryview(run_buf)
                reader.read_into(view, checksum=False)
                off = 0
                for k in range(i, j):
                    piece = bytes(view[off : off + sizes[k]])
                    chunks.append((piece,))
                    crcs.append(codec.crc32c(piece))
                    off += sizes[k]
                i = j
        return chunks, crcs
