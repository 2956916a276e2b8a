"""The client's data channel against a node that breaks the framing contract.

A real socket on loopback stands in for a misbehaving node: it reads the
client's request and answers with bytes chosen by the test. Whatever comes
back, the client raises a typed error (ProtocolError for a frame that does
not parse, the mapped status for a good error frame), never a protobuf
DecodeError, and the connection is not reused.
"""

from __future__ import annotations

import socket
import threading

import numpy as np
import pytest

from tensorcache.client.datachannel import DataPool
from tensorcache.dataproto import FRAME
from tensorcache.errors import InvalidArgument, ProtocolError
from tensorcache.proto import tensorcache_pb2 as pb

pytestmark = pytest.mark.integration


class FakeNode:
    """Accepts connections; answers each request with ``reply``; counts connections."""

    def __init__(self, reply: bytes) -> None:
        self.reply = reply
        self.accepted = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.accepted += 1
            with conn:
                conn.settimeout(10)
                try:
                    conn.recv(65536)  # magic + the request (small)
                    conn.sendall(self.reply)
                    conn.recv(1)  # until the client closes
                except OSError:
                    pass

    def close(self) -> None:
        self._listener.close()


def _get(pool: DataPool, address: str) -> None:
    with pool.connection(address) as dc:
        dc.get(pb.GetRequest(keys=[pb.EntryKey(key=b"k")]), lambda reply: [])


@pytest.mark.parametrize(
    "reply",
    [
        FRAME.pack(13, 3) + b"\xff\xff\xff",  # an error frame whose DataError does not parse
        FRAME.pack(0, 3) + b"\xff\xff\xff",  # a success frame whose GetReply does not parse
    ],
    ids=["error-frame", "reply-frame"],
)
def test_a_malformed_frame_is_a_protocol_error_and_the_connection_is_dropped(reply: bytes) -> None:
    node = FakeNode(reply)
    pool = DataPool(timeout_s=5)
    try:
        for _ in range(2):
            with pytest.raises(ProtocolError, match="malformed"):
                _get(pool, node.address)
        assert node.accepted == 2  # the broken connection was not reused
        with (
            pytest.raises(ProtocolError, match="malformed"),
            pool.connection(node.address) as dc,
        ):
            dc.put(pb.PutRequest(), [np.zeros(1, np.uint8)])
    finally:
        pool.close()
        node.close()


def test_a_well_formed_error_frame_keeps_its_status() -> None:
    err = pb.DataError(code=3, message="bad key").SerializeToString()
    node = FakeNode(FRAME.pack(3, len(err)) + err)
    pool = DataPool(timeout_s=5)
    try:
        with pytest.raises(InvalidArgument, match="bad key"):
            _get(pool, node.address)
    finally:
        pool.close()
        node.close()
