"""An Arrow Flight server holding tables in memory: the Flight peer of the benchmark.

``python -m bench.flight_server --port 0`` prints ``listening on PORT`` and
serves until SIGTERM. It runs in its own process (its own GIL, as a
tensorcache node does).

- ``do_put`` with descriptor path ``[key]`` stores the incoming table as it
  arrived (the client sends one uint8 column in 4 MiB record batches);
- ``do_get`` with ticket ``key`` streams that table back batch by batch;
- actions: ``ping``, ``delete`` (body: key), ``clear``.
"""

from __future__ import annotations

import argparse
import sys
import threading
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.flight as flight


class TableServer(flight.FlightServerBase):
    def __init__(self, location: str) -> None:
        super().__init__(location)
        self._tables: dict[bytes, pa.Table] = {}
        self._lock = threading.Lock()

    def do_put(
        self,
        context: flight.ServerCallContext,
        descriptor: flight.FlightDescriptor,
        reader: flight.MetadataRecordBatchReader,
        writer: flight.FlightMetadataWriter,
    ) -> None:
        key = descriptor.path[0]
        table = reader.read_all()  # keeps the received batches; no concatenation
        with self._lock:
            self._tables[key] = table

    def do_get(
        self, context: flight.ServerCallContext, ticket: flight.Ticket
    ) -> flight.RecordBatchStream:
        with self._lock:
            table = self._tables.get(ticket.ticket)
        if table is None:
            raise flight.FlightServerError(f"no such key: {ticket.ticket!r}")
        return flight.RecordBatchStream(table)

    def do_action(
        self, context: flight.ServerCallContext, action: flight.Action
    ) -> Iterator[flight.Result]:
        kind = action.type
        with self._lock:
            if kind == "delete":
                self._tables.pop(action.body.to_pybytes(), None)
            elif kind == "clear":
                self._tables.clear()
            elif kind != "ping":
                raise flight.FlightServerError(f"unknown action {kind!r}")
        return iter([flight.Result(b"ok")])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.flight_server")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args(argv)
    # SIGTERM keeps its default action (exit at once): the tables are
    # disposable, and calling shutdown() from a handler that runs inside
    # serve() would wait on serve() itself.
    server = TableServer(f"grpc://{args.host}:{args.port}")
    print(f"listening on {server.port}", flush=True)
    server.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
