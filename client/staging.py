"""Gets onto a device through a small ring of reused (pinned) host buffers.

A get onto a GPU must land in host memory first (the network, the data
channel's ``recv_into`` and the co-located ``process_vm_readv`` all write to
host memory). Landing the whole tensor in fresh pageable memory and then
copying it costs a full-size host copy, page faults on every new page, and
a synchronous driver-staged copy. Instead, each payload lands in a *slot*
of a small ring of page-locked buffers and is copied to the device
asynchronously from there, so:

* stripes are fetched in waves of ``slots // 2`` (in parallel, from the
  nodes that hold them) while the device copies of the previous wave run:
  receive and copy overlap, and the two halves of the ring alternate;
* a slot is reused only after the copy that read it has finished (its
  token), so a transfer never overwrites bytes a copy has yet to read;
* small tensors (one payload, no stripes) are packed into slots as their
  headers arrive; when a batch needs more than the ring holds, the rest
  goes to extra page-locked buffers, kept until their copies finish;
* checksums are checked on the host bytes, before any copy: a corrupt or
  replaced stripe is a miss (the manifest is read again, bounded), never
  garbage on the device.

Memory: ``slots * slot_bytes`` page-locked bytes per client and device
(default 8 slots of the stripe size, 64 MiB at 8 MiB stripes), allocated on
the first device get and reused by every later one; concurrent device gets
of one client take turns on the ring.

This module holds the pipeline only and never imports torch: the device
side is the ``Device`` protocol (client/torchio.py implements it with CUDA
streams and events), so the ring's reuse and overlap rules are tested on CPU
with a device whose copies run on a thread (tests/unit/test_staging.py).
Compressed entries are restored on the CPU (that is where they decompress)
and copied from there.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from tensorcache import codec
from tensorcache.client import compress, striping
from tensorcache.client.items import GetItem, layout_of, packed
from tensorcache.errors import InvalidArgument, ProtocolError
from tensorcache.keys import encode_key
from tensorcache.proto import tensorcache_pb2 as pb

SLOTS = 8
ALIGN = 256  # small payloads packed into a slot start on this boundary
GROUP_KEYS = 256  # keys per header round of a device get_many


class Device(Protocol):
    """The device side of a staged get (client/torchio.py: a CUDA device)."""

    def begin(self) -> None:
        """Before the first copy: order copies after work already queued by the caller."""

    def host(self, nbytes: int) -> np.ndarray:
        """A flat uint8 host buffer the device copies from fast (page-locked)."""
        ...

    def empty(self, nbytes: int) -> Any:
        """A flat uint8 destination of ``nbytes`` on the device."""

    def copy(self, src: np.ndarray, dst: Any, offset: int) -> None:
        """Queue a copy of ``src`` into ``dst[offset:offset + src.nbytes]`` (asynchronous)."""

    def mark(self) -> Any:
        """A token that completes once every copy queued so far has."""

    def wait(self, token: Any) -> None:
        """Block until ``token`` completed."""

    def finish(self) -> None:
        """After the last copy: the caller's later work sees every copy's bytes."""


class Ring:
    """``slots`` host buffers of ``slot_bytes``, each reused once its copies finished."""

    def __init__(self, device: Device, slots: int, slot_bytes: int) -> None:
        if slots < 2 or slots % 2:
            raise ValueError(f"a staging ring needs an even number >= 2 of slots, got {slots}")
        self.device = device
        self.slots = slots
        self.slot_bytes = slot_bytes
        self.lock = threading.Lock()  # one staged get at a time uses the ring
        self._buffers: list[np.ndarray | None] = [None] * slots
        self._tokens: list[Any] = [None] * slots
        self._next = 0
        self.waits = 0  # times a slot was still being copied from (the copy was the bottleneck)

    @property
    def wave(self) -> int:
        return self.slots // 2

    def take(self, nbytes: int) -> tuple[int, np.ndarray]:
        """The next slot (waiting for its last copy), as a buffer of at least ``nbytes``."""
        i = self._next
        self._next = (i + 1) % self.slots
        if self._tokens[i] is not None:
            self.waits += 1
            self.device.wait(self._tokens[i])
            self._tokens[i] = None
        buf = self._buffers[i]
        if buf is None or buf.nbytes < nbytes:  # a stripe larger than ours: grow this slot
            buf = self._buffers[i] = self.device.host(max(nbytes, self.slot_bytes))
        return i, buf

    def copied(self, i: int, token: Any) -> None:
        """Slot ``i`` is being copied from until ``token``."""
        self._tokens[i] = token


@dataclass(eq=False)
class _Small:
    """Packs the payloads of one header round into ring slots as headers arrive.

    Called from the transport's threads (one per node), hence the lock. A
    round takes at most ``ring.slots`` slots, so it never laps itself (a slot
    taken in this round has no copy queued yet); beyond that, and for a
    payload larger than a slot, it hands out extra page-locked buffers.
    """

    ring: Ring
    extra: list[np.ndarray]  # page-locked buffers beyond the ring (kept until copied)
    lock: threading.Lock
    taken: list[int]  # slots taken in this round, in order
    buf: np.ndarray | None = None
    used: int = 0

    def __call__(self, layout: codec.Layout) -> tuple[np.ndarray, np.ndarray]:
        n = layout.nbytes
        with self.lock:
            start = -(-self.used // ALIGN) * ALIGN
            if self.buf is not None and start + n <= self.buf.nbytes:
                view = self.buf[start : start + n]
                self.used = start + n
            elif n <= self.ring.slot_bytes and len(self.taken) < self.ring.slots:
                slot, self.buf = self.ring.take(n)
                self.taken.append(slot)
                view, self.used = self.buf[:n], n
            else:
                view = self.ring.device.host(n)
                self.extra.append(view)
        return view, view


@dataclass(eq=False)
class Staged:
    """One key of a device get: what it holds and where its bytes went on the device."""

    key: str
    version: int = 0
    layout: codec.Layout | None = None
    dest: Any = None  # flat uint8 device buffer (None: a miss)


DestFor = Callable[[str, codec.Layout], Any]  # (key, layout) -> flat uint8 device buffer
Read = Callable[[list[GetItem]], None]


def get_many(keys: list[str], ring: Ring, client: Any, dest_for: DestFor) -> dict[str, Staged]:
    """Fetch ``keys`` onto the ring's device; key -> Staged (dest None: a miss).

    Reads go through the client's own read of items (failover, retries,
    replica confirmation); ``dest_for`` makes (or checks the caller's)
    destination once a key's layout is known, before any byte is copied.
    """
    read: Read = client._read
    wanted = list(dict.fromkeys(keys))
    for key in wanted:
        encode_key(key)
    out = {k: Staged(k) for k in wanted}
    with ring.lock:
        ring.device.begin()
        extra: list[np.ndarray] = []
        try:
            for g in range(0, len(wanted), GROUP_KEYS):
                _group(wanted[g : g + GROUP_KEYS], ring, read, dest_for, out, extra)
        finally:
            ring.device.finish()
            if extra:  # buffers outside the ring: keep them until their copies are done
                ring.device.wait(ring.device.mark())
    return out


def layout_for(meta: pb.TensorMeta, where: str) -> codec.Layout:
    """The layout of the tensor an entry holds (the uncompressed one, if compressed)."""
    if not packed(meta):
        return layout_of(meta, where)
    c = meta.compression
    try:
        return codec.check_layout(c.dtype, tuple(c.shape), c.order, c.nbytes, meta.logical_dtype)
    except InvalidArgument as exc:
        raise ProtocolError(f"{where}: node sent bad metadata: {exc}") from exc


def _group(
    keys: list[str],
    ring: Ring,
    read: Read,
    dest_for: DestFor,
    out: dict[str, Staged],
    extra: list[np.ndarray],
) -> None:
    pending = keys
    # A stripe can vanish under a reader when a newer put replaced it; read
    # the manifest again (bounded) before calling it a miss, as Client.get does.
    for _ in range(3):
        small = _Small(ring, extra, threading.Lock(), [])
        items = [GetItem(k, pb.TENSOR, stage=small) for k in pending]
        striped: list[tuple[GetItem, codec.Layout, Any]] = []
        try:
            read(items)
            for it in items:
                if not it.found or it.meta is None:
                    continue
                layout = layout_for(it.meta, f"get {it.key!r}")
                dest = dest_for(it.key, layout)
                if it.meta.stripes:
                    striped.append((it, layout, dest))
                    continue
                src = it.array
                if packed(it.meta):  # decompressed on the host, copied from there
                    host = compress.restore(it.meta, it.array, None)
                    assert host is not None
                    src = codec.encode(host)[1]
                assert src is not None
                if layout.nbytes:
                    ring.device.copy(src.reshape(-1).view(np.uint8), dest, 0)
                out[it.key] = Staged(it.key, it.version, layout, dest)
        finally:
            # Even when this round fails half-way (a refused out=, a node down),
            # the slots it filled must not be reused before the copies queued.
            token = ring.device.mark()
            for i in small.taken:
                ring.copied(i, token)
        pending = _striped(striped, ring, read, out)
        if not pending:
            return
    for key in pending:
        out[key] = Staged(key)


def _striped(
    striped: list[tuple[GetItem, codec.Layout, Any]],
    ring: Ring,
    read: Read,
    out: dict[str, Staged],
) -> list[str]:
    """Fetch every stripe in waves through the ring; returns the keys that missed."""
    parts: list[tuple[GetItem, Any, pb.StripeRef]] = []
    for t, _, dest in striped:
        assert t.meta is not None
        for ref in t.meta.stripes:
            if ref.offset + ref.nbytes > t.meta.nbytes:
                raise ProtocolError(f"manifest of {t.key!r}: stripe beyond the tensor")
            parts.append((t, dest, ref))
    bad: set[int] = set()
    for w in range(0, len(parts), ring.wave):
        wave = [(t, d, r) for t, d, r in parts[w : w + ring.wave] if id(t) not in bad]
        if not wave:
            continue
        slots = [ring.take(r.nbytes) for _, _, r in wave]
        items = [
            GetItem(
                r.key.decode(),
                pb.SHARD,
                dest=buf[: r.nbytes],
                expect=r,
                put_id=t.meta.put_id if t.meta is not None else 0,
            )
            for (t, _, r), (_, buf) in zip(wave, slots, strict=True)
        ]
        read(items)
        for (t, dest, ref), p in zip(wave, items, strict=True):
            if not striping.stripe_ok(p):
                bad.add(id(t))
            elif id(t) not in bad:
                assert p.dest is not None
                ring.device.copy(p.dest, dest, ref.offset)
        token = ring.device.mark()
        for i, _ in slots:
            ring.copied(i, token)
    missed: list[str] = []
    for t, layout, dest in striped:
        if id(t) in bad:
            missed.append(t.key)
        else:
            out[t.key] = Staged(t.key, t.version, layout, dest)
    return missed
