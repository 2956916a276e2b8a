"""The disk tier's files: one file per entry, and the write-behind writer.

Layout: ``DIR/<2 hex>/<32 hex>-<version>.tce``, the hex a SHA-256 of the
entry's kind and key (keys are arbitrary UTF-8 and may be long), the version
in the name so a key's old and new files never share a path. A file is::

    fixed header (struct HEADER): magic, kind, key length, meta length,
        version, stamp, payload bytes, budget cost, payload CRC32C, header CRC32C
    key (UTF-8), meta (the entry's serialized TensorMeta), payload

Writes go to ``<name>.tmp`` and are renamed into place (no fsync: the tier
is a cache, and a crash of the *process* leaves the page cache intact; a
crash of the *machine* may leave a renamed file torn or empty, which the
checks below catch). Reading a file back checks everything: the header's own
CRC, the sizes against the file's length, and the payload's CRC32C, so a
torn or corrupted file is never served: it is reported (DiskCorrupt) and
dropped. ``scan`` (warm restart) checks headers and lengths only, not
payloads: reading back 100 GiB at start would take minutes, and every read
checks the payload anyway.

This module only moves bytes. Which entries live on disk, their budget and
their visibility are the store's business (node/tiered.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import struct
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tensorcache import codec
from tensorcache.errors import DataCorruption

log = logging.getLogger("tensorcache.node")

MAGIC = b"TCD1"
# magic, kind, key bytes, meta bytes, version, stamp, payload bytes, cost,
# payload crc32c, header crc32c (over everything before it, key and meta).
HEADER = struct.Struct("<4sBxxxIIQQQQII")
SUFFIX = ".tce"
Chunk = bytes | bytearray | memoryview | np.ndarray


class DiskCorrupt(DataCorruption):
    """A disk-tier file is torn, truncated or does not match its checksums."""


@dataclass(frozen=True, slots=True)
class DiskRef:
    """One entry's file: what the store needs to find, judge and charge it."""

    path: str
    kind: int
    key: str
    meta: bytes
    version: int
    stamp: int
    nbytes: int  # payload bytes
    cost: int  # what the entry costs in RAM once loaded (its original budget charge)
    crc: int  # payload CRC32C
    size: int  # the whole file's bytes: what the disk budget charges


def _name(kind: int, key: str, version: int) -> str:
    digest = hashlib.sha256(bytes((kind,)) + key.encode("utf-8")).hexdigest()[:32]
    return f"{digest[:2]}/{digest}-{version}{SUFFIX}"


def _header(
    ref_kind: int,
    key: bytes,
    meta: bytes,
    version: int,
    stamp: int,
    nbytes: int,
    cost: int,
    crc: int,
) -> bytes:
    fixed = HEADER.pack(MAGIC, ref_kind, len(key), len(meta), version, stamp, nbytes, cost, crc, 0)
    head_crc = codec.crc32c(key, codec.crc32c(meta, codec.crc32c(fixed[:-4])))
    return fixed[:-4] + struct.pack("<I", head_crc) + key + meta


class DiskFiles:
    """Entry files under one directory (created if missing)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def write(
        self,
        kind: int,
        key: str,
        meta: bytes,
        version: int,
        stamp: int,
        cost: int,
        chunks: Sequence[Chunk],
    ) -> DiskRef:
        """Write one entry; OSError (disk full, permissions) is the caller's to count."""
        crc = 0
        nbytes = 0
        for c in chunks:
            crc = codec.crc32c(c, crc)
            nbytes += len(c) if not isinstance(c, np.ndarray) else c.nbytes
        kb = key.encode("utf-8")
        head = _header(kind, kb, meta, version, stamp, nbytes, cost, crc)
        path = self.root / _name(kind, key, version)
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "wb", buffering=0) as f:
                f.write(head)
                for c in chunks:
                    view = memoryview(c).cast("B") if not isinstance(c, np.ndarray) else c
                    f.write(view)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return DiskRef(
            str(path), kind, key, meta, version, stamp, nbytes, cost, crc, len(head) + nbytes
        )

    def read(self, ref: DiskRef) -> np.ndarray:
        """The payload of ``ref``'s file, checked; DiskCorrupt if it is not intact."""
        try:
            with open(ref.path, "rb", buffering=0) as f:
                head = f.read(HEADER.size)
                parsed = _parse(head, f, ref.path)
                if parsed is None or parsed.version != ref.version or parsed.key != ref.key:
                    raise DiskCorrupt(f"disk tier: {ref.path} has a bad or foreign header")
                out = np.empty(ref.nbytes, dtype=np.uint8)
                got = f.readinto(memoryview(out)) if ref.nbytes else 0
                if got != ref.nbytes or f.read(1):
                    raise DiskCorrupt(
                        f"disk tier: {ref.path} holds {got} payload bytes, expected {ref.nbytes}"
                    )
        except FileNotFoundError as exc:
            raise DiskCorrupt(f"disk tier: {ref.path} is gone") from exc
        except OSError as exc:
            raise DiskCorrupt(f"disk tier: cannot read {ref.path}: {exc}") from exc
        crc = codec.crc32c(out)
        if crc != ref.crc:
            raise DiskCorrupt(
                f"disk tier: checksum mismatch in {ref.path} for {ref.key[:64]!r}: "
                f"read {crc:#010x}, written {ref.crc:#010x}"
            )
        return out

    @staticmethod
    def remove(ref: DiskRef) -> None:
        with contextlib.suppress(OSError):
            os.unlink(ref.path)

    def scan(self) -> tuple[list[DiskRef], int]:
        """Every intact-looking file, newest version per key; (refs, files dropped).

        Leftover ``.tmp`` files (a write cut short), files whose header does
        not check or whose length is not what the header says (torn), and
        older versions of a key are deleted.
        """
        best: dict[tuple[int, str], DiskRef] = {}
        dropped = 0
        for sub in sorted(self.root.iterdir()) if self.root.exists() else []:
            if not sub.is_dir():
                continue
            for path in sorted(sub.iterdir()):
                ref = None
                if path.name.endswith(SUFFIX):
                    ref = _probe(path)
                if ref is None:
                    log.warning("disk tier: dropping torn or foreign file %s", path)
                    dropped += 1
                    with contextlib.suppress(OSError):
                        path.unlink()
                    continue
                old = best.get((ref.kind, ref.key))
                if old is not None:
                    loser = old if old.version < ref.version else ref
                    self.remove(loser)
                    dropped += 1
                    if loser is ref:
                        continue
                best[(ref.kind, ref.key)] = ref
        return list(best.values()), dropped


@dataclass(frozen=True, slots=True)
class _Parsed:
    kind: int
    key: str
    meta: bytes
    version: int
    stamp: int
    nbytes: int
    cost: int
    crc: int
    head_size: int


def _parse(head: bytes, f: object, path: str) -> _Parsed | None:
    """Parse a header whose fixed part is ``head``; ``f`` is positioned after it."""
    if len(head) != HEADER.size:
        return None
    magic, kind, klen, mlen, version, stamp, nbytes, cost, crc, head_crc = HEADER.unpack(head)
    if magic != MAGIC or klen > 65536 or mlen > 1 << 20:
        return None
    rest = f.read(klen + mlen)  # type: ignore[attr-defined]  # a binary file
    if len(rest) != klen + mlen:
        return None
    kb, meta = rest[:klen], rest[klen:]
    if codec.crc32c(kb, codec.crc32c(meta, codec.crc32c(head[:-4]))) != head_crc:
        return None
    try:
        key = kb.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return _Parsed(
        kind, key, bytes(meta), version, stamp, nbytes, cost, crc, HEADER.size + klen + mlen
    )


def _probe(path: Path) -> DiskRef | None:
    """The ref of a file whose header checks and whose length matches, else None."""
    try:
        with open(path, "rb", buffering=0) as f:
            parsed = _parse(f.read(HEADER.size), f, str(path))
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return None
    if parsed is None or size != parsed.head_size + parsed.nbytes:
        return None
    return DiskRef(
        str(path),
        parsed.kind,
        parsed.key,
        parsed.meta,
        parsed.version,
        parsed.stamp,
        parsed.nbytes,
        parsed.cost,
        parsed.crc,
        size,
    )


class WriteBehind:
    """A bounded queue of writes and the one thread that performs them.

    ``offer`` never blocks: past ``max_bytes`` queued it refuses (the caller
    counts a drop). ``done(item, ref)`` is called on the writer thread after
    each write, with None when the write failed; it must not raise.
    """

    def __init__(
        self,
        max_bytes: int,
        write: Callable[[object], DiskRef],
        done: Callable[[object, DiskRef | None], None],
    ) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be > 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._write = write
        self._done = done
        self._queue: deque[tuple[object, int]] = deque()
        self._bytes = 0
        self._busy = False
        self._closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="disk-writer", daemon=True)
        self._thread.start()

    @property
    def queued_bytes(self) -> int:
        return self._bytes

    def offer(self, item: object, nbytes: int) -> bool:
        with self._cond:
            if self._closed or self._bytes + nbytes > self.max_bytes:
                return False
            self._queue.append((item, nbytes))
            self._bytes += nbytes
            self._cond.notify()
            return True

    def _next(self) -> tuple[object, int] | None:
        with self._cond:
            self._busy = False
            self._cond.notify_all()
            while not self._queue and not self._closed:
                self._cond.wait()
            if not self._queue:
                return None
            self._busy = True
            return self._queue.popleft()

    def _loop(self) -> None:
        while (got := self._next()) is not None:
            item, nbytes = got
            ref: DiskRef | None = None
            try:
                ref = self._write(item)
            except Exception as exc:  # disk full, permissions: a drop, not a crash
                log.warning("disk tier: write failed: %s", exc)
            try:
                self._done(item, ref)
            except Exception:
                log.exception("disk tier: bookkeeping after a write failed")
            with self._cond:
                self._bytes -= nbytes

    def flush(self, timeout_s: float) -> bool:
        """Wait until every queued write is done (bounded); whether it was."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and not self._busy, timeout_s)

    def close(self, timeout_s: float = 10.0) -> None:
        """Finish what is queued (bounded by ``timeout_s``), then stop the thread."""
        self.flush(timeout_s)
        with self._cond:
            self._closed = True
            self._queue.clear()
            self._cond.notify_all()
        self._thread.join(timeout=timeout_s)
