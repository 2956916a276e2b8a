"""A fault-injecting TCP proxy for the soak: asyncio, one thread, run-time control.

Each *route* listens on one (host, port) and forwards every connection to
one of its upstreams (tried in turn, starting one further each connection,
so a route with several upstreams is a small load balancer that skips dead
ones). Routes carry a *group* name (a node's name); faults are set per group
while traffic flows, from any thread:

* ``latency_s``: every chunk is delivered that much later (in order; a
  stream's throughput is not divided by the latency, as with a real link);
* ``bandwidth_bps``: each direction of each connection is paced to it;
* ``blackhole``: nothing is delivered and nothing is read while it holds:
  bytes wait, as on a link that drops every packet and retransmits later,
  so the stream is intact if it heals before the peers give up. New
  connections are accepted and held (not connected upstream) until then;
* ``reset(group)``: every open connection is closed with a TCP RST at once.

Nothing here knows about tensorcache: it moves bytes. The soak puts one
route in front of each node's gRPC port and one in front of its data port,
on a loopback address of the node's own (127.0.0.N), and advertises that
address, so clients *and* node-to-node traffic pass through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

T = TypeVar("T")

CHUNK = 64 * 1024
#: Chunks in flight per direction before the reader waits (backpressure).
QUEUE_CHUNKS = 32
CONNECT_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class Faults:
    latency_s: float = 0.0
    bandwidth_bps: int = 0  # 0: unlimited
    blackhole: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.latency_s <= 60:
            raise ValueError(f"latency_s must be 0..60, got {self.latency_s}")
        if self.bandwidth_bps < 0:
            raise ValueError(f"bandwidth_bps must be >= 0, got {self.bandwidth_bps}")


@dataclass
class _Group:
    faults: Faults = field(default_factory=Faults)
    healed: asyncio.Event = field(default_factory=asyncio.Event)
    conns: set[_Conn] = field(default_factory=set)
    connections: int = 0
    resets: int = 0
    bytes: int = 0


class _Conn:
    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.writers: list[asyncio.StreamWriter] = [client]
        self.tasks: list[asyncio.Task[None]] = []

    def abort(self) -> None:
        """Close both sides with RST (SO_LINGER 0), not a FIN."""
        for w in self.writers:
            sock = w.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            w.transport.abort()
        for t in self.tasks:
            t.cancel()


class FaultProxy:
    """``with FaultProxy() as p: port = p.add_route("n0", ("127.0.0.2", 0), [up])``."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="fault-proxy", daemon=True)
        self._groups: dict[str, _Group] = {}
        self._servers: list[asyncio.Server] = []
        self._started = False

    # ------------------------------------------------------------------ lifecycle
    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def start(self) -> FaultProxy:
        self._thread.start()
        self._started = True
        return self

    def stop(self) -> None:
        if not self._started:
            return
        with contextlib.suppress(Exception):
            self._call(self._close_all(), timeout=10.0)
        self._started = False
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10.0)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        if not self._started:
            coro.close()
            raise RuntimeError("proxy not started")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # ------------------------------------------------------------------ control (any thread)
    def add_route(
        self, group: str, listen: tuple[str, int], upstreams: list[tuple[str, int]]
    ) -> int:
        """Listen on ``listen`` (port 0: any free one); returns the bound port."""
        if not upstreams:
            raise ValueError("a route needs at least one upstream")
        return self._call(self._add_route(group, listen, list(upstreams)))

    def set_faults(self, group: str, faults: Faults) -> None:
        self._call(self._set_faults(group, faults))

    def heal(self, group: str) -> None:
        self.set_faults(group, Faults())

    def reset(self, group: str) -> int:
        """RST every open connection of ``group``; returns how many."""
        return self._call(self._reset(group))

    def stats(self) -> dict[str, dict[str, Any]]:
        return self._call(self._stats())

    # ------------------------------------------------------------------ loop side
    def _group(self, name: str) -> _Group:
        g = self._groups.get(name)
        if g is None:
            g = self._groups[name] = _Group()
            g.healed.set()
        return g

    async def _add_route(
        self, group: str, listen: tuple[str, int], upstreams: list[tuple[str, int]]
    ) -> int:
        g = self._group(group)
        turn = [0]

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            start = turn[0]
            turn[0] += 1
            await self._serve(g, reader, writer, upstreams, start)

        server = await asyncio.start_server(handle, listen[0], listen[1], reuse_address=True)
        self._servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    async def _set_faults(self, group: str, faults: Faults) -> None:
        g = self._group(group)
        g.faults = replace(faults)
        if faults.blackhole:
            g.healed.clear()
        else:
            g.healed.set()

    async def _reset(self, group: str) -> int:
        g = self._group(group)
        conns = list(g.conns)
        for c in conns:
            c.abort()
        g.conns.clear()
        g.resets += len(conns)
        return len(conns)

    async def _stats(self) -> dict[str, dict[str, Any]]:
        return {
            name: {
                "open": len(g.conns),
                "connections": g.connections,
                "resets": g.resets,
                "bytes": g.bytes,
                "faults": g.faults,
            }
            for name, g in self._groups.items()
        }

    async def _close_all(self) -> None:
        for s in self._servers:
            s.close()
        for g in self._groups.values():
            for c in list(g.conns):
                c.abort()
            g.conns.clear()
            g.healed.set()
        me = asyncio.current_task()
        rest = [t for t in asyncio.all_tasks() if t is not me]
        for t in rest:
            t.cancel()
        await asyncio.gather(*rest, return_exceptions=True)

    async def _serve(
        self,
        g: _Group,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        upstreams: list[tuple[str, int]],
        start: int,
    ) -> None:
        conn = _Conn(writer)
        g.conns.add(conn)
        g.connections += 1
        try:
            await g.healed.wait()  # a black hole holds new connections too
            up: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
            for i in range(len(upstreams)):
                host, port = upstreams[(start + i) % len(upstreams)]
                try:
                    up = await asyncio.wait_for(
                        asyncio.open_connection(host, port), CONNECT_TIMEOUT_S
                    )
                    break
                except (OSError, TimeoutError):
                    continue
            if up is None:
                conn.abort()  # as a refused connection: the client sees a reset
                return
            conn.writers.append(up[1])
            a = asyncio.ensure_future(self._pipe(g, reader, up[1]))
            b = asyncio.ensure_future(self._pipe(g, up[0], writer))
            conn.tasks = [a, b]
            done, pending = await asyncio.wait(conn.tasks, return_when=asyncio.FIRST_COMPLETED)
            if pending and all(t.result() for t in done):
                await asyncio.wait(pending)  # a clean half-close: let the other side finish
            elif pending:
                conn.abort()  # one side failed: pass the reset on
        except asyncio.CancelledError:
            pass
        finally:
            g.conns.discard(conn)
            for t in conn.tasks:
                t.cancel()
            for w in conn.writers:
                w.close()

    async def _pipe(self, g: _Group, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> bool:
        """Copy src to dst through the group's faults; True if it ended with a clean EOF."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(QUEUE_CHUNKS)

        async def read() -> None:
            try:
                while True:
                    await g.healed.wait()
                    data = await src.read(CHUNK)
                    await queue.put((time.monotonic() + g.faults.latency_s, data))
                    if not data:
                        return
            except (OSError, ConnectionError):
                await queue.put((0.0, b""))

        async def write() -> bool:
            while True:
                due, data = await queue.get()
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                await g.healed.wait()
                if not data:
                    if due == 0.0:
                        return False  # the reader failed
                    with contextlib.suppress(OSError, RuntimeError):
                        dst.write_eof()
                        await dst.drain()
                    return True
                dst.write(data)
                await dst.drain()
                g.bytes += len(data)
                bps = g.faults.bandwidth_bps
                if bps:
                    await asyncio.sleep(len(data) / bps)

        reading = asyncio.ensure_future(read())
        try:
            return await write()
        except (OSError, ConnectionError):
            return False
        finally:
            reading.cancel()
