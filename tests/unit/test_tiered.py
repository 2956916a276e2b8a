"""The disk tier under the store: spill, read back, and the same rules as RAM.

Real files in a tmp dir, the real writer thread; ``flush()`` waits for it
(bounded), so nothing here sleeps. Every test of a rule (overwrite, delete,
invalidation, demotion, keep-newer, conditional writes) first makes sure
the entry it is about really is on disk only (``on_disk``).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest

from tensorcache.errors import VersionConflict
from tensorcache.node.disktier import DiskFiles
from tensorcache.node.store import NewEntry, entry_cost
from tensorcache.node.tiered import TieredStore, spilled

pytestmark = pytest.mark.unit

TENSOR = 0
KiB = 1024
VALUE = 64 * KiB  # payload of each test entry: above MIN_SPILL
COST = entry_cost("k0", VALUE, 4)


def payload(seed: int, n: int = VALUE) -> bytes:
    return np.random.default_rng(seed).integers(0, 255, n, dtype=np.uint8).tobytes()


def put(store: TieredStore, key: str, seed: int, **kw: object) -> int:
    data = payload(seed)
    cost = entry_cost(key, len(data), 4)
    res = store.reserve(cost)
    [(version, _)] = store.commit(res, [NewEntry((TENSOR, key), b"meta", (data,), cost, **kw)])
    return version


def read(store: TieredStore, key: str, **kw: bool) -> bytes | None:
    entry = store.get((TENSOR, key), **kw)
    return None if entry is None else b"".join(bytes(memoryview(c)) for c in entry.chunks)


def make(tmp_path: Path, entries_in_ram: int = 2, **kw: object) -> TieredStore:
    """A store whose RAM holds ``entries_in_ram`` test entries beside the queue."""
    queue = kw.pop("queue_bytes", 4 * VALUE)
    # + 40 KiB: the RAM index of ~50 spilled entries, less than one more entry.
    capacity = entries_in_ram * COST + 40 * KiB + queue  # type: ignore[operator]
    kw.setdefault("disk_capacity", 1 << 30)
    return TieredStore(capacity, disk_path=tmp_path / "disk", queue_bytes=queue, **kw)  # type: ignore[arg-type]


def on_disk(store: TieredStore, key: str) -> bool:
    store.flush(10)
    entries = {e.key[1]: e for e in store.judge(store.keys())}
    entry = entries.get(key)
    return entry is not None and spilled(entry)


def files(tmp_path: Path) -> list[Path]:
    return sorted(p for p in (tmp_path / "disk").rglob("*") if p.is_file())


def test_evicted_entries_are_written_behind_and_read_back_exactly(tmp_path):
    store = make(tmp_path)
    for i in range(5):
        put(store, f"k{i}", i)
    assert on_disk(store, "k0") and on_disk(store, "k1") and on_disk(store, "k2")
    for i in range(5):
        assert read(store, f"k{i}") == payload(i)
    d = store.disk_stats()
    assert d.hits >= 3 and d.spills >= 3 and d.write_drops == 0
    s = store.stats()
    assert s.evictions == 0  # nothing lost: spilled, not dropped
    assert s.entries_by_kind == {TENSOR: 5}
    assert s.bytes_used + s.bytes_reserved <= s.capacity
    store.close()


def test_a_read_promotes_and_a_second_eviction_writes_nothing(tmp_path):
    store = make(tmp_path)
    for i in range(3):
        put(store, f"k{i}", i)
    assert on_disk(store, "k0")
    spills = store.disk_stats().spills
    assert read(store, "k0") == payload(0)  # promoted: k1 spills to make room
    assert not on_disk(store, "k0")
    put(store, "k3", 3)
    put(store, "k4", 4)  # k0 evicted again: its file is still valid, no new write
    assert on_disk(store, "k0")
    assert read(store, "k0") == payload(0)
    store.flush(10)
    assert store.disk_stats().spills == spills + 3  # k1, k2, k3: not k0 again
    store.close()


def test_no_stale_read_from_disk_after_an_overwrite(tmp_path):
    store = make(tmp_path)
    v1 = put(store, "k0", 1)
    put(store, "k1", 11)
    put(store, "k2", 12)
    assert on_disk(store, "k0")
    v2 = put(store, "k0", 2)  # the new value is in RAM; the old file must go
    assert v2 > v1
    assert read(store, "k0") == payload(2)
    put(store, "k3", 13)
    put(store, "k4", 14)  # push the new value to disk too
    assert on_disk(store, "k0")
    assert read(store, "k0") == payload(2)
    assert store.get((TENSOR, "k0")).version == v2
    names = [p.name for p in files(tmp_path)]
    assert not any(n.endswith(f"-{v1}.tce") for n in names)  # the old file is gone
    store.close()


def test_no_stale_read_from_disk_after_a_delete(tmp_path):
    store = make(tmp_path)
    for i in range(4):
        put(store, f"k{i}", i)
    assert on_disk(store, "k0")
    before = len(files(tmp_path))
    deleted = store.delete((TENSOR, "k0"))
    assert deleted is not None and deleted.chunks  # reported like a RAM entry (not a manifest)
    assert read(store, "k0") is None
    assert read(store, "k0", demoted_ok=True) is None  # not for handoffs either
    assert len(files(tmp_path)) == before - 1
    store.close()


def test_no_stale_read_from_disk_after_an_invalidation(tmp_path):
    dead: set[str] = set()
    store = make(tmp_path, stale=lambda e: e.key[1].startswith("ns/") and "ns/" in dead)
    put(store, "ns/a", 1)
    put(store, "other", 2)
    put(store, "k2", 3)
    put(store, "k3", 4)
    assert on_disk(store, "ns/a") and on_disk(store, "other")
    dead.add("ns/")
    assert read(store, "ns/a") is None
    assert read(store, "ns/a", demoted_ok=True) is None
    assert read(store, "other") == payload(2)
    assert store.stats().invalidated == 1
    store.flush(10)
    # ns/a's file went with it; "other" (read back) keeps its file, k2 spilled for its room.
    assert store.disk_stats().files == 2 == len(files(tmp_path))
    store.close()


def test_a_spilled_entry_is_demoted_and_hidden_by_the_placement_rule(tmp_path):
    class Judge:
        placement_epoch = 1
        verdicts: dict[str, str] = {}

        def placement(self, key: str, checked: int, demoted: bool) -> str:
            return self.verdicts.get(key, "keep")

    judge = Judge()
    store = make(tmp_path, judge=judge)
    put(store, "away", 1, checked=1)
    put(store, "back", 2, checked=1)
    put(store, "k2", 3, checked=1)
    put(store, "k3", 4, checked=1)
    assert on_disk(store, "away") and on_disk(store, "back")
    judge.placement_epoch = 2
    judge.verdicts = {"away": "demote", "back": "discard"}
    assert read(store, "away") is None  # demoted: hidden from clients
    assert read(store, "away", demoted_ok=True) == payload(1)  # handoffs still read it
    assert read(store, "back") is None  # maybe stale: hidden
    back = store.suspect((TENSOR, "back"))  # what the node's handoff judges
    assert back is not None and back.demoted and not spilled(back)
    assert b"".join(bytes(c) for c in back.chunks) == payload(2)
    assert store.revive(back, 2, frozenset())
    assert read(store, "back") == payload(2)
    assert store.stats().demoted == 1
    store.close()


def test_keep_newer_and_conditional_writes_see_the_version_on_disk(tmp_path):
    store = make(tmp_path)
    v = put(store, "k0", 1)
    put(store, "k1", 2)
    put(store, "k2", 3)
    assert on_disk(store, "k0")
    # A pushed copy older than the spilled one: the newer one is kept.
    assert put(store, "k0", 9, version=v - 5, stamp=1) == v
    assert read(store, "k0") == payload(1)
    put(store, "k3", 4)
    put(store, "k4", 5)
    assert on_disk(store, "k0")
    with pytest.raises(VersionConflict):
        put(store, "k0", 7, if_version=0)  # "only if absent": it is there, on disk
    assert put(store, "k0", 8, if_version=v) > v
    assert read(store, "k0") == payload(8)
    store.close()


def test_a_full_write_queue_drops_and_counts(tmp_path):
    store = make(tmp_path, entries_in_ram=1, queue_bytes=VALUE + 1)
    # The writer is held on its first file while the puts run, so the queue
    # fills whatever the scheduler does (left to race, a writer that kept up
    # on a busy host made this test fail with no drop at all).
    gate = threading.Event()
    write = store._writer._write
    store._writer._write = lambda item: (gate.wait(10), write(item))[1]
    for i in range(30):
        put(store, f"k{i}", i)
    gate.set()
    store.flush(10)
    d, s = store.disk_stats(), store.stats()
    assert d.write_drops > 0
    # A drop is a loss, counted like an eviction (the disk budget evicted nothing).
    assert (s.evictions, d.evictions) == (d.write_drops, 0)
    held = sum(read(store, f"k{i}") == payload(i) for i in range(30))
    assert held == 30 - s.evictions  # everything not dropped is readable, exactly
    store.close()


def test_the_disk_budget_evicts_its_coldest_entry(tmp_path):
    # A queue that takes every spill: all six reach the disk, three fit.
    store = make(tmp_path, disk_capacity=3 * (VALUE + 200), queue_bytes=16 * VALUE)
    for i in range(8):
        put(store, f"k{i}", i)
    store.flush(10)
    d, s = store.disk_stats(), store.stats()
    assert d.bytes_used <= d.capacity
    assert (d.write_drops, d.evictions, s.evictions, d.files) == (0, 3, 3, 3)
    assert read(store, "k0") is None  # the coldest went for good
    assert read(store, "k7") == payload(7)
    store.close()


def test_a_corrupt_file_is_never_served(tmp_path):
    store = make(tmp_path)
    for i in range(4):
        put(store, f"k{i}", i)
    assert on_disk(store, "k0")
    entries = {e.key[1]: e for e in store.judge(store.keys())}
    path = next(
        Path(e.chunks.ref.path)
        for e in entries.values()
        if spilled(e)  # type: ignore[attr-defined]
    )
    with open(path, "r+b") as f:
        f.seek(-10, os.SEEK_END)
        f.write(b"\xff" * 10)
    key = next(k for k, e in entries.items() if spilled(e) and Path(e.chunks.ref.path) == path)  # type: ignore[attr-defined]
    assert read(store, key) is None
    assert store.disk_stats().corrupt == 1
    assert read(store, key) is None  # dropped: gone, not retried
    store.close()


def test_a_restart_finds_its_files_as_hidden_suspects_and_drops_torn_ones(tmp_path):
    store = make(tmp_path)
    versions = {f"k{i}": put(store, f"k{i}", i) for i in range(6)}
    store.flush(10)
    store.close()
    on = files(tmp_path)
    assert len(on) >= 4
    torn = on[0]
    torn.write_bytes(torn.read_bytes()[:-100])  # a crash mid-write
    (torn.parent / "leftover.tce.tmp").write_bytes(b"half")
    junk = torn.parent / "zz-1.tce"
    junk.write_bytes(b"not a tensorcache file")

    again = make(tmp_path)
    d = again.disk_stats()
    assert d.loaded == len(on) - 1
    assert d.corrupt == 3  # the torn file, the leftover and the junk
    assert not torn.exists() and not junk.exists()
    s = again.stats()
    assert s.demoted == d.loaded and s.entries_by_kind.get(TENSOR, 0) == 0  # all hidden
    found = 0
    for key, version in versions.items():
        assert read(again, key) is None  # unknown freshness: never served as it is
        entry = again.suspect((TENSOR, key))
        if entry is not None:  # the node's handoff decides; here: nobody has newer
            assert entry.version == version
            assert again.revive(entry, 1, frozenset())
            assert read(again, key) == payload(int(key[1:]))
            found += 1
    assert found == d.loaded
    # Versions assigned after the restart exceed every one found on disk.
    assert put(again, "k0", 99) > max(versions.values())
    again.close()


def test_a_write_finishing_after_an_overwrite_is_discarded(tmp_path):
    """The writer may still be writing an old value when a put replaces it."""
    store = make(tmp_path, entries_in_ram=1, queue_bytes=48 * VALUE)  # room for every spill
    for round_ in range(20):
        put(store, "hot", 100 + round_)
        put(store, "filler", round_)  # evicts "hot" (to the queue, maybe on to disk)
    store.flush(10)
    assert store.disk_stats().write_drops == 0
    assert read(store, "hot") == payload(119)
    assert len(DiskFiles(tmp_path / "disk").scan()[0]) == store.disk_stats().files
    store.close()


def test_disk_options_are_checked(tmp_path):
    with pytest.raises(ValueError, match="disk_capacity"):
        TieredStore(1 << 20, disk_path=tmp_path, disk_capacity=0)
    with pytest.raises(ValueError, match="queue"):
        TieredStore(1 << 20, disk_path=tmp_path, disk_capacity=1 << 20, queue_bytes=1 << 20)


def test_a_manifest_spills_with_its_stripes_and_comes_back_without_bytes(tmp_path):
    """A striped tensor's manifest (no bytes) must not be dropped while its stripes spill."""
    store = make(tmp_path)
    cost = entry_cost("m", 0, 4)
    res = store.reserve(cost)
    [(version, _)] = store.commit(res, [NewEntry((TENSOR, "m"), b"meta", (), cost)])
    for i in range(4):
        put(store, f"k{i}", i)
    store.flush(10)
    entries = {e.key[1]: e for e in store.judge(store.keys())}
    assert spilled(entries["m"]) and not entries["m"].chunks and list(entries["m"].chunks) == []
    got = store.get((TENSOR, "m"))
    assert got is not None and got.version == version and got.chunks == ()
    assert store.stats().evictions == 0
    store.close()
