"""A store with a disk tier under its RAM: evicted entries are written behind.

``TieredStore`` is the node's ``Store`` (node/store.py) with one change of
meaning: an entry evicted from RAM is not forgotten but *spilled*. It stays
in the store's one map of entries, with its version, stamp and bookkeeping
(demoted, checked, holders), and only its bytes move to a file
(node/disktier.py). So every rule the store applies to an entry applies to
a spilled one unchanged, because it is the same code on the same map:
namespace invalidation (the ``stale`` rule), placement (the ``Judge``:
demotion, hidden copies), keep-newer commits and conditional writes (they
compare against the entry's version, wherever its bytes are), deletes and
drops (they remove the entry, and with it its file). An overwrite, a delete
or an invalidation therefore can never leave an older value readable from
disk: there is no second index to forget to update.

States of an entry's bytes:

* *resident*: in RAM, in the RAM eviction policy, charged in full. It may
  also have a file of the same version (it was read back from disk): then
  evicting it again costs no write.
* *pending*: evicted, its bytes held by the write-behind queue until the
  writer thread has written them; still served from those bytes. Charged
  only its index cost; the queue's bytes come out of ``capacity`` (the
  store's entry budget is ``capacity - queue_bytes``), so RAM stays within
  ``--capacity`` however far the disk lags.
* *spilled*: only its file holds the bytes (``chunks`` is a ``DiskChunks``
  that reads and checks the file when iterated). Charged its index cost in
  RAM (key, metadata and the per-entry overhead: the index lives in RAM)
  and its file size in the disk budget, with its own eviction order (LRU).

Eviction from RAM never waits on the disk: a victim is handed to the writer
queue if it has room, else dropped (``write_drops``, and counted in
``evictions`` like any entry lost). Entries smaller than ``min_spill`` are
dropped as before (their index would cost nearly what they do), except
manifests (no bytes: the stripe list of a striped tensor), which spill to a
file of their metadata: dropping one would lose a tensor whose stripes are
on disk. A spilled
entry read by a get is loaded outside the store's lock (the file is read
and its CRC32C checked), then *promoted*: made resident again if nothing
changed meanwhile, RAM victims spilling to make room. If RAM has no room
(puts in flight hold it) the loaded copy is served without being kept. A
file that fails its checks is dropped with its entry (``disk_corrupt``) and
the get misses. Handoffs to other nodes and the rebalance scan read spilled
entries through ``DiskChunks`` without promoting them.

Warm restart: at start the directory is scanned (node/disktier.py ``scan``:
torn and leftover files dropped) and every file becomes a spilled entry of
*unknown freshness*: demoted, judged at no epoch, held by nobody. While the
node was down its keys may have been written, deleted or invalidated
elsewhere, so such an entry is never served as it is (docs/consistency.md,
"Warm restart"): an invalidation recorded in the ring hides it by its stamp;
on a read, the store's placement rule treats it as a copy whose key lived
elsewhere meanwhile, and the node's handoff asks the key's other owners:
a newer copy or a delete there wins, otherwise it is served again.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tensorcache.node.disktier import DiskCorrupt, DiskFiles, DiskRef, WriteBehind
from tensorcache.node.entry import NO_HOLDERS, Entry, Judge, StoreKey, entry_cost
from tensorcache.node.policy import EvictionPolicy, make_policy
from tensorcache.node.store import Store
from tensorcache.proto import tensorcache_pb2 as pb

log = logging.getLogger("tensorcache.node")

#: Entries with fewer payload bytes are not spilled: the RAM index of a
#: spilled entry (~0.8 KiB) would cost about what holding it does.
MIN_SPILL = 16 * 1024
#: Default write-behind queue: this much of the RAM budget holds evicted
#: bytes on their way to disk (at most 1/8 of the budget).
QUEUE_BYTES = 256 * 1024 * 1024


def _nbytes(chunk: object) -> int:
    return chunk.nbytes if isinstance(chunk, np.ndarray) else len(chunk)  # type: ignore[arg-type]


class DiskChunks(Sequence[np.ndarray]):
    """A spilled entry's bytes: its file, read and checked whenever iterated.

    Stands in for ``Entry.chunks`` (one chunk), so the code that streams an
    entry (pushes, drains) reads it from disk without knowing; reads raise
    DiskCorrupt if the file is torn or gone.
    """

    __slots__ = ("_files", "ref")

    def __init__(self, files: DiskFiles, ref: DiskRef) -> None:
        self._files = files
        self.ref = ref

    def __len__(self) -> int:
        return 1 if self.ref.nbytes else 0

    def __bool__(self) -> bool:
        return self.ref.nbytes > 0

    def __getitem__(self, i: int) -> np.ndarray:  # type: ignore[override]
        if i not in (0, -1) or not self.ref.nbytes:
            raise IndexError(i)
        return self._files.read(self.ref)

    def __iter__(self) -> Iterator[np.ndarray]:
        if self.ref.nbytes:  # a manifest has no chunks (its file only holds its metadata)
            yield self._files.read(self.ref)


def spilled(entry: Entry) -> bool:
    """Whether ``entry``'s bytes are only on disk."""
    return isinstance(entry.chunks, DiskChunks)


@dataclass(frozen=True, slots=True)
class DiskStats:
    capacity: int
    bytes_used: int  # file bytes held
    files: int
    hits: int  # entries (tensors and stripes) gets read from disk
    spills: int  # entries written to disk
    write_drops: int  # evicted entries the write queue had no room for (lost)
    evictions: int  # files evicted for the disk budget
    corrupt: int  # files found torn or corrupt (at start or on read) and dropped
    loaded: int  # entries found on disk at start (warm restart)
    queued_bytes: int  # evicted bytes waiting for the writer


@dataclass
class _Counters:
    hits: int = 0
    spills: int = 0
    write_drops: int = 0
    evictions: int = 0
    corrupt: int = 0
    loaded: int = 0


@dataclass(frozen=True, slots=True)
class _Write:
    pending: Entry  # the entry object that stands for the bytes until written


class TieredStore(Store):
    """A Store whose RAM evictions spill to files under ``disk_path``.

    ``capacity`` bounds RAM as for a Store, write-behind queue included.
    ``disk_capacity`` bounds the files. The rest as for ``Store``.
    """

    def __init__(
        self,
        capacity: int,
        policy: str | EvictionPolicy = "lru",
        *,
        disk_path: str | Path,
        disk_capacity: int,
        queue_bytes: int | None = None,
        min_spill: int = MIN_SPILL,
        counted_kinds: Sequence[int] = (0,),
        stale: Callable[[Entry], bool] | None = None,
        judge: Judge | None = None,
        pinned_capacity: int | None = None,
    ) -> None:
        if disk_capacity <= 0:
            raise ValueError(f"disk_capacity must be > 0 bytes, got {disk_capacity}")
        queue = queue_bytes if queue_bytes is not None else min(QUEUE_BYTES, capacity // 8)
        if not 0 < queue < capacity:
            raise ValueError(
                f"the write-behind queue ({queue} bytes) must be > 0 and leave part of "
                f"the capacity ({capacity} bytes) for entries"
            )
        super().__init__(
            capacity - queue,
            policy,
            counted_kinds=counted_kinds,
            stale=stale,
            judge=judge,
            pinned_capacity=pinned_capacity,  # pinned entries are never evicted, so never spilled
        )
        self._files = DiskFiles(disk_path)
        self._disk_capacity = disk_capacity
        self._min_spill = min_spill
        self._disk_policy = make_policy("lru")
        self._refs: dict[StoreKey, DiskRef] = {}  # valid for the entry of that key and version
        self._disk_used = 0
        self._t = _Counters()
        self._writer = WriteBehind(queue, self._write, self._written)
        self._load()

    # -- reads: a spilled entry is loaded, checked, and promoted ----------------------
    def get(self, key: StoreKey, *, demoted_ok: bool = False) -> Entry | None:
        entry = super().get(key, demoted_ok=demoted_ok)
        if entry is None or not spilled(entry):
            return entry
        # Handoffs to other nodes (demoted_ok) read without promoting or counting.
        return self._materialize(entry, promote=not demoted_ok, counted=not demoted_ok)

    def peek(self, key: StoreKey) -> Entry | None:
        entry = super().peek(key)
        return self._materialize(entry, promote=True) if entry and spilled(entry) else entry

    def suspect(self, key: StoreKey) -> Entry | None:
        entry = super().suspect(key)
        return self._materialize(entry, promote=True) if entry and spilled(entry) else entry

    def _materialize(self, entry: Entry, *, promote: bool, counted: bool = False) -> Entry | None:
        """``entry`` (spilled) with its bytes; resident again if ``promote`` and possible.

        Its visibility was judged under the lock when it was looked up; the
        file is read after, without the lock. If the entry changed meanwhile
        (a put replaced it), the loaded copy is still the value that was
        current when this read was made, so it is served, just not kept.
        """
        assert isinstance(entry.chunks, DiskChunks)
        ref = entry.chunks.ref
        try:
            data = self._files.read(ref)
        except DiskCorrupt as exc:
            log.warning("%s; dropped", exc)
            with self._lock:
                self._t.corrupt += 1
                if self._entries.get(entry.key) is entry:
                    self._remove_locked(entry.key)
                    self._c.evictions += 1  # lost, like an entry evicted for room
                if counted and entry.key[0] in self._counted:  # the get counted a hit
                    self._c.hits -= 1
                    self._c.misses += 1
            return None
        loaded = dataclasses.replace(entry, chunks=(data,) if ref.nbytes else (), cost=ref.cost)
        with self._lock:
            if counted:
                self._t.hits += 1
            if not promote or self._entries.get(entry.key) is not entry:
                return loaded
            need = loaded.cost - entry.cost
            # Room from RAM victims only (they spill); never from the disk
            # tier, whose coldest entry could be this very one.
            while (
                self._used + self._reserved + need > self._capacity
                and self._policy.victim() is not None
            ):
                self._evict_one_locked()
            if self._used + self._reserved + need > self._capacity:
                return loaded  # puts in flight hold the room: serve, don't keep
            self._swap_locked(entry, loaded)
            self._policy.inserted(entry.key)
            self._disk_policy.accessed(entry.key)
            return loaded

    # -- eviction: spill instead of drop ----------------------------------------------------
    def _evict_one_locked(self) -> bool:
        victim = self._policy.victim()
        if victim is None:
            # RAM holds only the index of spilled entries: lose the coldest.
            return self._evict_disk_locked()
        entry = self._entries[victim]  # type: ignore[index]  # the policy holds our keys
        if self._spill_locked(entry):
            self._policy.removed(victim)
            return True
        return super()._evict_one_locked()  # dropped: counted in evictions

    def _spill_locked(self, entry: Entry) -> bool:
        """Move ``entry``'s bytes out of RAM (to its file, or the write queue)."""
        index = self._index_cost(entry)
        ref = self._refs.get(entry.key)
        if ref is not None and ref.version == entry.version:  # read back earlier: on disk
            self._swap_locked(entry, self._as_spilled(entry, ref))
            return True
        nbytes = sum(_nbytes(c) for c in entry.chunks)
        # A manifest (no bytes: a striped tensor's stripe list) spills too:
        # dropping it would lose the whole tensor while its stripes sit on disk.
        if 0 < nbytes < self._min_spill or nbytes >= self._disk_capacity:
            return False
        pending = dataclasses.replace(entry, cost=index)
        if not self._writer.offer(_Write(pending), nbytes):
            self._t.write_drops += 1
            return False
        self._swap_locked(entry, pending)
        return True

    def _write(self, item: object) -> DiskRef:
        """On the writer thread, no lock held: write one pending entry's bytes."""
        assert isinstance(item, _Write)
        e = item.pending
        full = entry_cost(e.key[1], sum(_nbytes(c) for c in e.chunks), len(e.meta))
        return self._files.write(e.key[0], e.key[1], e.meta, e.version, e.stamp, full, e.chunks)

    def _written(self, item: object, ref: DiskRef | None) -> None:
        """On the writer thread: the write of ``item`` finished (``ref``) or failed (None)."""
        assert isinstance(item, _Write)
        pending = item.pending
        key = pending.key
        with self._lock:
            current = self._entries.get(key)
            if ref is None:
                if current is pending:  # its bytes are nowhere else now
                    self._remove_locked(key)
                    self._c.evictions += 1
                    self._t.write_drops += 1
                return
            if current is None or current.version != ref.version or key in self._refs:
                # Replaced, deleted, invalidated or dropped while it was written.
                self._files.remove(ref)
                return
            self._t.spills += 1
            self._refs[key] = ref
            self._disk_used += ref.size
            self._disk_policy.inserted(key)
            if current is pending:
                self._swap_locked(pending, self._as_spilled(pending, ref))
            while self._disk_used > self._disk_capacity and self._evict_disk_locked():
                pass

    def _evict_disk_locked(self) -> bool:
        """Free the disk tier's coldest file; its entry goes too if only the file held it."""
        victim = self._disk_policy.victim()
        if victim is None:
            return False
        key: StoreKey = victim  # type: ignore[assignment]  # the policy holds our keys
        self._t.evictions += 1
        entry = self._entries.get(key)
        if entry is not None and spilled(entry):
            self._remove_locked(key)  # the entry and its file
            self._c.evictions += 1
        else:
            self._drop_ref_locked(key)  # resident: only its copy on disk goes
        return True

    # -- bookkeeping (lock held) -------------------------------------------------------
    def _remove_locked(self, key: StoreKey) -> Entry | None:
        old = super()._remove_locked(key)
        self._drop_ref_locked(key)
        return old

    def _drop_ref_locked(self, key: StoreKey) -> None:
        ref = self._refs.pop(key, None)
        if ref is not None:
            self._disk_used -= ref.size
            self._disk_policy.removed(key)
            # Unlinked now, not later: a file outliving its entry would come
            # back as a (suspect) copy after a restart.
            self._files.remove(ref)

    def _swap_locked(self, old: Entry, new: Entry) -> None:
        """Replace ``old`` by ``new`` (same key, version and bookkeeping) in the map."""
        self._entries[old.key] = new
        self._used += new.cost - old.cost

    def _as_spilled(self, entry: Entry, ref: DiskRef) -> Entry:
        return dataclasses.replace(
            entry,
            chunks=DiskChunks(self._files, ref),  # type: ignore[arg-type]  # a lazy tuple
            cost=self._index_cost(entry),
        )

    @staticmethod
    def _index_cost(entry: Entry) -> int:
        return entry_cost(entry.key[1], 0, len(entry.meta))

    # -- warm restart ---------------------------------------------------------------------
    def _load(self) -> None:
        """Adopt the files a previous run left, as entries of unknown freshness."""
        refs, dropped = self._files.scan()
        self._t.corrupt += dropped
        with self._lock:
            for ref in sorted(refs, key=lambda r: r.version, reverse=True):
                key: StoreKey = (ref.kind, ref.key)
                index = entry_cost(ref.key, 0, len(ref.meta))
                if (
                    self._used + index > self._capacity
                    or self._disk_used + ref.size > self._disk_capacity
                ):
                    self._files.remove(ref)  # a smaller budget than last time
                    continue
                entry = Entry(
                    key,
                    ref.meta,
                    DiskChunks(self._files, ref),  # type: ignore[arg-type]  # a lazy tuple
                    ref.version,
                    index,
                    ref.stamp,
                    demoted=True,  # hidden until judged: see the module docstring
                    checked=0,
                    holders=NO_HOLDERS,
                )
                self._entries[key] = entry
                self._demoted[key] = None
                self._used += index
                self._refs[key] = ref
                self._disk_used += ref.size
                self._disk_policy.inserted(key)
                self._clock.absorb(ref.version)
                self._t.loaded += 1
        if refs or dropped:
            log.info(
                "disk tier %s: %d entries found (%d bytes), %d torn or old files dropped",
                self._files.root,
                self._t.loaded,
                self._disk_used,
                dropped,
            )

    # -- reporting and shutdown ---------------------------------------------------------
    def disk_stats(self) -> DiskStats:
        with self._lock:
            return DiskStats(
                capacity=self._disk_capacity,
                bytes_used=self._disk_used,
                files=len(self._refs),
                hits=self._t.hits,
                spills=self._t.spills,
                write_drops=self._t.write_drops,
                evictions=self._t.evictions,
                corrupt=self._t.corrupt,
                loaded=self._t.loaded,
                queued_bytes=self._writer.queued_bytes,
            )

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every evicted entry queued for disk is written (bounded)."""
        return self._writer.flush(timeout_s)

    def close(self, timeout_s: float = 10.0) -> None:
        self._writer.close(timeout_s)


def disk_stats(store: TieredStore, out: pb.NodeStats) -> None:
    """Fill the disk tier's fields of a Stat reply."""
    d = store.disk_stats()
    out.disk_capacity = d.capacity
    out.disk_bytes = d.bytes_used
    out.disk_files = d.files
    out.disk_hits = d.hits
    out.disk_spills = d.spills
    out.disk_write_drops = d.write_drops
    out.disk_evictions = d.evictions
    out.disk_corrupt = d.corrupt
    out.disk_loaded = d.loaded
