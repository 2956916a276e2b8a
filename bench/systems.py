"""One adapter per system under test, all with the same small surface.

A case (bench/cases.py) only calls ``System`` methods, so every system is
timed by the same loop. What each adapter counts as "a get" is part of the
comparison and is stated here:

- tensorcache: ``Client.get`` — allocates and fills a fresh array, checks
  CRC32C of every stripe (a co-located read skips the check by default).
  Where the build has ``get(key, out=...)`` a second row ("get→out") fills
  a destination allocated and touched before timing, like the socket's.
- Flight: ``do_get``; the size comes from the schema's metadata, a fresh
  array is allocated and each 4 MiB batch's buffer copied into it.
- Redis: redis-py ``GET`` (its pure-Python reply parser, no hiredis) and
  ``np.frombuffer`` over the returned bytes (read-only, no further copy).
- socket: ``recv_into`` a destination allocated and touched *before*
  timing (no page faults): the loopback limit, not a cache.

A put sends the caller's array without staging copies wherever the client
allows it: Redis gets a ``memoryview`` (redis-py writes it to the socket
as is; ``tobytes()`` would add a full copy), Flight zero-copy
``pa.array`` batches, the socket ``sendall`` of the array itself.
"""

from __future__ import annotations

import inspect
import socket
from typing import Any, Protocol

import numpy as np

from bench.measure import touched
from bench.peers import Server
from bench.sock_server import ACK, HEADER, recv_exact_into

FLIGHT_BATCH = 4 * 1024 * 1024
CALL_TIMEOUT_S = 600.0  # per call, for every peer: a stuck server fails the case, not the run


class System(Protocol):
    """What a case needs from a system; batched ops are optional (``batched``)."""

    name: str  # short id used in rows and JSON: "tensorcache", "flight", ...
    batched: bool  # whether put_many/get_many exist

    def server_pids(self) -> dict[str, int]: ...
    def limit(self, nbytes: int) -> str | None: ...  # why a size cannot run, or None
    def prepare(self, nbytes: int) -> None: ...  # untimed, before a size's cases
    def put(self, key: str, value: np.ndarray) -> None: ...
    def get(self, key: str, nbytes: int) -> np.ndarray | None: ...
    def delete(self, key: str) -> None: ...
    def put_many(self, values: dict[str, np.ndarray]) -> None: ...
    def get_many(self, keys: list[str], nbytes: int) -> list[np.ndarray | None]: ...
    def finish(self, nbytes: int) -> None: ...  # untimed, frees what prepare made
    def close(self) -> None: ...


class Tensorcache:
    batched = True

    def __init__(self, name: str, router: str, node_pids: dict[str, int], **options: Any) -> None:
        import tensorcache

        self.name = name
        self.client = tensorcache.connect(router, **options)
        self._pids = node_pids
        #: Whether ``Client.get`` can fill a caller's array (``out=``), in this build.
        self.fills_out = "out" in inspect.signature(self.client.get).parameters

    def server_pids(self) -> dict[str, int]:
        return dict(self._pids)

    def limit(self, nbytes: int) -> str | None:
        return None

    def prepare(self, nbytes: int) -> None:
        pass

    def put(self, key: str, value: np.ndarray) -> None:
        self.client.put(key, value)

    def get(self, key: str, nbytes: int) -> np.ndarray | None:
        return self.client.get(key)

    def get_into(self, key: str, out: np.ndarray) -> np.ndarray | None:
        """``get`` into the caller's (reused, already touched) array."""
        return self.client.get(key, out=out)  # type: ignore[call-arg,no-any-return]

    def delete(self, key: str) -> None:
        self.client.delete(key)

    def put_many(self, values: dict[str, np.ndarray]) -> None:
        self.client.put_many(values)

    def get_many(self, keys: list[str], nbytes: int) -> list[np.ndarray | None]:
        return list(self.client.get_many(keys).values())

    def stored_bytes(self) -> dict[str, int]:
        """Bytes each node reports holding (its budget's ``bytes_used``)."""
        return {s.name: s.bytes_used for s in self.client.stats()}

    def finish(self, nbytes: int) -> None:
        pass

    def close(self) -> None:
        self.client.close()


class Flight:
    batched = False

    def __init__(self, server: Server) -> None:
        import pyarrow as pa
        import pyarrow.flight as flight

        self.name = "flight"
        self._pa, self._fl = pa, flight
        self._server = server
        self.client = flight.connect(f"grpc://{server.address}")
        self._opts = flight.FlightCallOptions(timeout=CALL_TIMEOUT_S)  # no call hangs forever

    def server_pids(self) -> dict[str, int]:
        return {"flight": self._server.pid}

    def limit(self, nbytes: int) -> str | None:
        return None

    def prepare(self, nbytes: int) -> None:
        pass

    def put(self, key: str, value: np.ndarray) -> None:
        pa, fl = self._pa, self._fl
        flat = value.reshape(-1).view(np.uint8)
        schema = pa.schema([("bytes", pa.uint8())], metadata={"nbytes": str(flat.nbytes)})
        writer, _ = self.client.do_put(fl.FlightDescriptor.for_path(key), schema, self._opts)
        with writer:
            for off in range(0, flat.nbytes, FLIGHT_BATCH):
                part = pa.array(flat[off : off + FLIGHT_BATCH])  # zero-copy view
                writer.write_batch(pa.record_batch([part], schema=schema))

    def get(self, key: str, nbytes: int) -> np.ndarray | None:
        reader = self.client.do_get(self._fl.Ticket(key.encode()), self._opts)
        size = int(reader.schema.metadata[b"nbytes"])
        out = np.empty(size, np.uint8)
        off = 0
        for chunk in reader:
            col = chunk.data.column(0)
            n = len(col)
            src = np.frombuffer(col.buffers()[1], np.uint8, count=n, offset=col.offset)
            out[off : off + n] = src
            off += n
        if off != size:
            raise RuntimeError(f"flight: got {off} of {size} bytes for {key!r}")
        return out

    def delete(self, key: str) -> None:
        list(self.client.do_action(self._fl.Action("delete", key.encode()), self._opts))

    def put_many(self, values: dict[str, np.ndarray]) -> None:
        raise NotImplementedError("flight has no batched put here")

    def get_many(self, keys: list[str], nbytes: int) -> list[np.ndarray | None]:
        raise NotImplementedError("flight has no batched get here")

    def finish(self, nbytes: int) -> None:
        list(self.client.do_action(self._fl.Action("clear", b""), self._opts))

    def close(self) -> None:
        self.client.close()


class Redis:
    batched = True
    MAX_BULK = 4 * 1024**3  # the --proto-max-bulk-len the server was started with

    def __init__(self, server: Server) -> None:
        import redis

        self.name = "redis"
        self._server = server
        self.client = redis.Redis(
            server.host, server.port, socket_timeout=CALL_TIMEOUT_S, socket_connect_timeout=5
        )

    def server_pids(self) -> dict[str, int]:
        return {"redis": self._server.pid}

    def limit(self, nbytes: int) -> str | None:
        return "n/a (redis limit)" if nbytes > self.MAX_BULK else None

    def prepare(self, nbytes: int) -> None:
        pass

    def put(self, key: str, value: np.ndarray) -> None:
        self.client.set(key, memoryview(value.reshape(-1).view(np.uint8)))

    def get(self, key: str, nbytes: int) -> np.ndarray | None:
        raw = self.client.get(key)
        return None if raw is None else np.frombuffer(raw, np.uint8)

    def delete(self, key: str) -> None:
        self.client.delete(key)

    def put_many(self, values: dict[str, np.ndarray]) -> None:
        self.client.mset({k: memoryview(v.reshape(-1).view(np.uint8)) for k, v in values.items()})

    def get_many(self, keys: list[str], nbytes: int) -> list[np.ndarray | None]:
        return [None if r is None else np.frombuffer(r, np.uint8) for r in self.client.mget(keys)]

    def finish(self, nbytes: int) -> None:
        self.client.flushall()

    def close(self) -> None:
        self.client.close()


class Socket:
    """One TCP stream to bench/sock_server.py; keys are ignored (one buffer)."""

    batched = True

    def __init__(self, server: Server) -> None:
        self.name = "socket"
        self._server = server
        self.sock = socket.create_connection((server.host, server.port), timeout=CALL_TIMEOUT_S)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._dest: np.ndarray | None = None
        self._ack = bytearray(1)

    def server_pids(self) -> dict[str, int]:
        return {"socket": self._server.pid}

    def limit(self, nbytes: int) -> str | None:
        return None

    def _request(self, op: bytes, nbytes: int) -> None:
        self.sock.sendall(HEADER.pack(op, nbytes))
        self._wait_ack()

    def _wait_ack(self) -> None:
        if not recv_exact_into(self.sock, memoryview(self._ack)) or self._ack != ACK:
            raise RuntimeError("socket baseline: bad or missing ack")

    def prepare(self, nbytes: int) -> None:
        self._request(b"A", nbytes)  # server buffer allocated and touched
        self._dest = touched(nbytes)  # and so is ours: no page faults while timed

    def put(self, key: str, value: np.ndarray) -> None:
        self.sock.sendall(HEADER.pack(b"P", value.nbytes))
        self.sock.sendall(memoryview(value.reshape(-1).view(np.uint8)))
        self._wait_ack()

    def get(self, key: str, nbytes: int) -> np.ndarray | None:
        dest = self._dest
        if dest is None or dest.nbytes < nbytes:
            raise RuntimeError("socket baseline: prepare(nbytes) first")
        self.sock.sendall(HEADER.pack(b"G", nbytes))
        if not recv_exact_into(self.sock, memoryview(dest)[:nbytes]):
            raise RuntimeError("socket baseline: server closed")
        return dest[:nbytes]

    def delete(self, key: str) -> None:
        pass

    def put_many(self, values: dict[str, np.ndarray]) -> None:
        parts: list[bytes | memoryview] = []
        for v in values.values():
            parts.append(HEADER.pack(b"P", v.nbytes))
            parts.append(memoryview(v.reshape(-1).view(np.uint8)))
        self.sock.sendall(b"".join(parts))  # pipelined: all requests, then all acks
        for _ in values:
            self._wait_ack()

    def get_many(self, keys: list[str], nbytes: int) -> list[np.ndarray | None]:
        dest = self._dest
        if dest is None or dest.nbytes < nbytes * len(keys):
            raise RuntimeError("socket baseline: prepare(nbytes * len(keys)) first")
        self.sock.sendall(HEADER.pack(b"G", nbytes) * len(keys))  # pipelined
        if not recv_exact_into(self.sock, memoryview(dest)[: nbytes * len(keys)]):
            raise RuntimeError("socket baseline: server closed")
        return [dest[i * nbytes : (i + 1) * nbytes] for i in range(len(keys))]

    def finish(self, nbytes: int) -> None:
        self._dest = None
        self._request(b"F", 0)

    def close(self) -> None:
        self.sock.close()
