"""Stream a safetensors checkpoint into the cluster as a revision (``tensorcache load``).

Tensor by tensor, never the whole file: small tensors are read into one
batch buffer (``batch_bytes``, 16 MiB) and put together (one ``put_many``:
few round trips); a tensor larger than the batch is read into a buffer of
its own, grown as needed and reused, and put alone. Peak memory is then
about two batches (the buffer and its read-back) plus the largest tensor,
whatever the checkpoint's size (tests/integration/test_weights_load.py
measures it). Reads use ``preadv`` on an open descriptor straight into the
buffers; values are views of them (no copy), and the client sends them with
no copy either.

Verification: every tensor is read back from the cluster and its CRC32C is
compared with that of the file's bytes (a put is already checked by the
node against the CRC the client computed; the read-back proves what is
stored reads back as the file has it). Then the manifest is put, last: the
revision becomes visible whole, or not at all (tensorcache/torch/revision.py).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tensorcache import codec
from tensorcache.client.api import Client
from tensorcache.errors import DataCorruption
from tensorcache.torch.checkpoint import Checkpoint, TensorInfo, by_file, open_checkpoint, read_into
from tensorcache.torch.revision import (
    Manifest,
    TensorRecord,
    check_prefix,
    commit,
    read_manifest,
    tensor_key,
)
from tensorcache.torch.tensors import describe, from_buffer, raw_bytes

MIB = 1024 * 1024
ALIGN = 64  # tensors in the batch buffer start 64-byte aligned (any dtype's alignment)


@dataclass(frozen=True)
class LoadReport:
    prefix: str
    tensors: int
    nbytes: int
    seconds: float
    verified: bool
    already: bool = False  # the revision was committed already: nothing was loaded

    @property
    def gbps(self) -> float:
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


class _Progress:
    """A tqdm bar in bytes (its rate reads MB/s, GB/s), or nothing."""

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self._bar: Any = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total, unit="B", unit_scale=True, unit_divisor=1000, desc=desc, leave=True
            )

    def update(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def load_checkpoint(
    client: Client,
    path: str | os.PathLike[str],
    prefix: str,
    *,
    pin: bool = False,
    verify: bool = True,
    progress: bool = False,
    batch_bytes: int = 16 * MIB,
    on_tensor: Callable[[str, Any], None] | None = None,
) -> LoadReport:
    """Put the checkpoint at ``path`` under revision ``prefix``, tensor by tensor.

    ``pin``: pin every tensor and the manifest (node/pins.py). ``on_tensor(name,
    value)`` sees each value while its buffer is valid (``load_safetensors``
    copies them out there). A revision committed already is not loaded again
    (``LoadReport.already``).
    """
    check_prefix(prefix)
    start = time.perf_counter()
    ckpt = open_checkpoint(path)
    if read_manifest(client, prefix) is not None:
        return LoadReport(prefix, len(ckpt.tensors), 0, 0.0, False, already=True)
    bar = _Progress(ckpt.nbytes, f"load {prefix}", progress)
    try:
        recs = _stream(client, ckpt, prefix, pin, verify, batch_bytes, bar.update, on_tensor)
    finally:
        bar.close()
    commit(client, Manifest(prefix, recs, dict(ckpt.metadata)), pin=pin)
    return LoadReport(prefix, len(recs), ckpt.nbytes, time.perf_counter() - start, verify)


def _stream(
    client: Client,
    ckpt: Checkpoint,
    prefix: str,
    pin: bool,
    verify: bool,
    batch_bytes: int,
    advance: Callable[[int], None],
    on_tensor: Callable[[str, Any], None] | None,
) -> dict[str, TensorRecord]:
    recs: dict[str, TensorRecord] = {}
    batch = bytearray(batch_bytes)
    big = bytearray(0)
    for file, tensors in by_file(ckpt.tensors):
        fd = os.open(file, os.O_RDONLY)
        try:
            pending: list[tuple[TensorInfo, int]] = []  # (tensor, offset in batch)
            used = 0
            for t in tensors:
                if t.nbytes > batch_bytes:
                    if len(big) < t.nbytes:
                        big = bytearray(0)  # free the old one before growing
                        big = bytearray(t.nbytes)
                    view = memoryview(big)[: t.nbytes]
                    read_into(fd, t, view)
                    _put(client, prefix, [(t, view)], pin, verify, recs, on_tensor)
                    advance(t.nbytes)
                    continue
                at = -(-used // ALIGN) * ALIGN
                if at + t.nbytes > batch_bytes:
                    _flush(client, prefix, batch, pending, pin, verify, recs, on_tensor, advance)
                    pending, at = [], 0
                read_into(fd, t, memoryview(batch)[at : at + t.nbytes])
                pending.append((t, at))
                used = at + t.nbytes
            _flush(client, prefix, batch, pending, pin, verify, recs, on_tensor, advance)
        finally:
            os.close(fd)
    return recs


def _flush(
    client: Client,
    prefix: str,
    batch: bytearray,
    pending: list[tuple[TensorInfo, int]],
    pin: bool,
    verify: bool,
    recs: dict[str, TensorRecord],
    on_tensor: Callable[[str, Any], None] | None,
    advance: Callable[[int], None],
) -> None:
    if not pending:
        return
    mv = memoryview(batch)
    _put(
        client,
        prefix,
        [(t, mv[at : at + t.nbytes]) for t, at in pending],
        pin,
        verify,
        recs,
        on_tensor,
    )
    advance(sum(t.nbytes for t, _ in pending))


def _put(
    client: Client,
    prefix: str,
    items: list[tuple[TensorInfo, memoryview]],
    pin: bool,
    verify: bool,
    recs: dict[str, TensorRecord],
    on_tensor: Callable[[str, Any], None] | None,
) -> None:
    values = {tensor_key(prefix, t.name): from_buffer(t.dtype, t.shape, view) for t, view in items}
    crcs = {k: codec.crc32c(raw_bytes(v)) for k, v in values.items()} if verify else {}
    client.put_many(values, pin=pin)
    for (t, _), value in zip(items, values.values(), strict=True):
        recs[t.name] = describe(value)
        if on_tensor is not None:
            on_tensor(t.name, value)
    if not verify:
        return
    if len(values) == 1 and items[0][0].nbytes > 0:
        # A large tensor reads back into its own buffer once its file CRC is
        # taken: no second buffer of the largest tensor's size.
        [(key, value)] = values.items()
        got: dict[str, Any] = {key: client.get(key, out=value)}
    else:
        got = client.get_many(list(values))
    for key, value in got.items():
        if value is None:
            raise DataCorruption(
                f"load: {key!r} was put but does not read back (evicted at once? "
                "the cluster may be too small for this checkpoint: pin it or add capacity)"
            )
        crc = codec.crc32c(raw_bytes(value))
        if crc != crcs[key]:
            raise DataCorruption(
                f"load: {key!r} reads back with crc32c {crc:#010x}, the file has {crcs[key]:#010x}"
            )


def open_and_describe(path: str | os.PathLike[str]) -> Checkpoint:
    """The checkpoint at ``path`` (validated), for callers that print what they will load."""
    return open_checkpoint(Path(path))
