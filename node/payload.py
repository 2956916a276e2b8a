"""Payload streams: split a received stream by entry, and chunk stored entries to send.

The Put and Get streams carry the concatenation of their entries' bytes with
no boundaries of their own (proto/tensorcache.proto); the receiver splits
them by each entry's ``nbytes``. Used by the gRPC servicer and by the node's
own node-to-node calls (handoffs, drains).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from tensorcache import codec
from tensorcache.errors import InvalidArgument
from tensorcache.node.store import Entry

Buffer = bytes | bytearray | memoryview | np.ndarray
# Payload chunks smaller than this are coalesced into one message on Get.
COALESCE_BELOW = 256 * 1024
MAX_CHUNK = 4 * 1024 * 1024


def split_payload(
    messages: Iterable[bytes], sizes: list[int]
) -> tuple[list[tuple[Buffer, ...]], list[int]]:
    """Split a payload stream into per-entry chunk lists, with their CRC32Cs."""
    total = sum(sizes)
    out: list[list[Buffer]] = [[] for _ in sizes]
    crcs = [0] * len(sizes)
    idx, need, received = 0, sizes[0] if sizes else 0, 0
    for msg in messages:
        if received + len(msg) > total:
            raise InvalidArgument(f"put: payload exceeds the {total} bytes the header declares")
        received += len(msg)
        pos = 0
        while pos < len(msg):
            while need == 0:
                idx += 1
                need = sizes[idx]
            take = min(need, len(msg) - pos)
            piece = msg if (pos == 0 and take == len(msg)) else msg[pos : pos + take]
            out[idx].append(piece)
            crcs[idx] = codec.crc32c(piece, crcs[idx])
            pos += take
            need -= take
    if received != total:
        raise InvalidArgument(
            f"put: payload ended after {received} bytes, the header declares {total}"
        )
    return [tuple(c) for c in out], crcs


def payload_chunks(entries: list[Entry]) -> Iterator[Buffer]:
    """The stored chunks of every found entry in order, small ones coalesced."""
    pending: list[Buffer] = []
    pending_bytes = 0
    for entry in entries:
        for chunk in entry.chunks:
            if len(chunk) >= COALESCE_BELOW:
                if pending:
                    yield b"".join(pending)
                    pending, pending_bytes = [], 0
                if len(chunk) <= MAX_CHUNK:
                    yield chunk
                else:  # stored whole by the data channel: slice for gRPC
                    view = memoryview(chunk)
                    for off in range(0, len(chunk), MAX_CHUNK):
                        yield view[off : off + MAX_CHUNK]
            else:
                pending.append(chunk)
                pending_bytes += len(chunk)
                if pending_bytes >= COALESCE_BELOW:
                    yield b"".join(pending)
                    pending, pending_bytes = [], 0
    if pending:
        yield b"".join(pending)
