"""The checker's analysis on hand-made histories: each check must pass and must fail.

A green checker run proves something only if every check can go red, so
each property gets a history that violates it and near-misses that do not
(overlapping operations, failed puts, failed invalidations). Times are
small integers standing for ``time.monotonic_ns()``.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = pytest.mark.unit


def _load(name: str) -> ModuleType:
    """tests/integration/<name>.py by path (it is not an installed module)."""
    if name in sys.modules:
        return sys.modules[name]
    path = Path(__file__).resolve().parents[1] / "integration" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


ch = _load("checker_history")
cw = _load("checker_worker")
Put, Get, Invalidate, History = ch.Put, ch.Get, ch.Invalidate, ch.History


def put(key: str, start: int, end: int | None, version: int | None, *, w: int = 0, seq: int = 0):
    return Put(
        writer=w,
        seq=seq,
        key=key,
        checksum=f"sum-{w}-{seq}",
        start=start,
        end=end,
        version=version,
        error="" if version is not None else "Unavailable: node down",
    )


def read(key: str, start: int, end: int, of=None, **override) -> object:
    """A get of ``key`` that returned the value of put ``of`` (None: a miss)."""
    if of is None:
        return Get(key=key, start=start, end=end, found=False, **override)
    fields = {"writer": of.writer, "seq": of.seq, "checksum": of.checksum}
    fields.update(override)
    return Get(key=key, start=start, end=end, found=True, **fields)


def inv(prefix: str, start: int, end: int, *, ok: bool = True) -> object:
    return Invalidate(prefix, start, end, generation=7 if ok else None, error="" if ok else "E: x")


def violations(h) -> dict[str, int]:
    return {k: len(v) for k, v in ch.check_all(h).items()}


CLEAN = {"stale_reads": 0, "torn_values": 0, "invalidated_reads": 0, "version_order": 0}


# ------------------------------------------------------------------ clean histories
def test_a_correct_history_passes_every_check():
    a = put("ns-a/1", 0, 10, 100, seq=1)
    b = put("ns-a/1", 20, 30, 200, seq=2)
    c = put("ns-a/1", 25, 45, 300, w=1, seq=1)  # overlaps b: either order is fine
    h = History(
        puts=[a, b, c],
        gets=[
            read("ns-a/1", 11, 19, a),
            read("ns-a/1", 21, 29, a),  # b not completed when the get began
            read("ns-a/1", 31, 40, b),  # c still running
            read("ns-a/1", 31, 50, c),  # c began before the get ended
            read("ns-a/1", 50, 60, c),
            read("ns-a/2", 50, 60),  # a miss is no version
            Get("ns-a/1", 61, 62, error="Unavailable: x"),
        ],
    )
    assert violations(h) == CLEAN


def test_empty_history_passes():
    assert violations(History()) == CLEAN


# ------------------------------------------------------------------ (1) stale reads
def test_read_older_than_a_completed_put_is_stale():
    a = put("k", 0, 10, 100, seq=1)
    b = put("k", 20, 30, 200, seq=2)
    h = History(puts=[a, b], gets=[read("k", 31, 40, a)])
    found = ch.check_fresh_reads(h)
    assert len(found) == 1 and "stale read" in found[0] and "version 200" in found[0]


def test_put_completing_exactly_when_the_read_begins_does_not_count():
    a = put("k", 0, 10, 100, seq=1)
    b = put("k", 20, 31, 200, seq=2)
    assert ch.check_fresh_reads(History(puts=[a, b], gets=[read("k", 31, 40, a)])) == []


def test_staleness_is_per_key():
    a = put("k", 0, 10, 100, seq=1)
    other = put("j", 20, 30, 900, seq=2)
    assert ch.check_fresh_reads(History(puts=[a, other], gets=[read("k", 31, 40, a)])) == []


def test_failed_put_is_never_a_floor_and_may_be_read():
    a = put("k", 0, 10, 100, seq=1)
    failed = put("k", 12, 15, None, seq=2)
    b = put("k", 20, 30, 200, seq=3)
    h = History(
        puts=[a, failed, b],
        gets=[
            read("k", 16, 18, a),  # the failed put may not have happened
            read("k", 16, 18, failed),  # or may have
            read("k", 40, 50, failed),  # its version is unknown: not called stale
            read("k", 40, 50, b),
        ],
    )
    assert violations(h) == CLEAN


def test_put_whose_worker_died_is_a_failed_put():
    died = put("k", 12, None, None, seq=2)
    assert not died.completed
    assert violations(History(puts=[died], gets=[read("k", 13, 20, died)])) == CLEAN


# ------------------------------------------------------------------ (2) torn values
def test_checksum_mismatch_is_torn():
    a = put("k", 0, 10, 100, seq=1)
    h = History(puts=[a], gets=[read("k", 20, 30, a, checksum="sum-of-two-halves")])
    found = ch.check_no_torn(h)
    assert len(found) == 1 and "torn or foreign" in found[0]


def test_unknown_writer_and_undecodable_value_are_torn():
    a = put("k", 0, 10, 100, seq=1)
    h = History(
        puts=[a],
        gets=[
            read("k", 20, 30, a, writer=5, seq=99),
            read("k", 20, 30, a, writer=None, seq=None, checksum="x"),
        ],
    )
    assert len(ch.check_no_torn(h)) == 2


def test_value_of_another_key_is_foreign():
    a = put("k", 0, 10, 100, seq=1)
    found = ch.check_no_torn(History(puts=[a], gets=[read("j", 20, 30, a)]))
    assert len(found) == 1 and "'k'" in found[0]


def test_value_from_a_put_that_began_after_the_read_ended():
    late = put("k", 50, 60, 100, seq=1)
    found = ch.check_no_torn(History(puts=[late], gets=[read("k", 20, 30, late)]))
    assert len(found) == 1 and "future" in found[0]


def test_torn_read_is_not_also_reported_as_stale():
    a = put("k", 0, 10, 100, seq=1)
    b = put("k", 20, 30, 200, seq=2)
    h = History(puts=[a, b], gets=[read("k", 31, 40, a, checksum="bad")])
    assert violations(h) == {**CLEAN, "torn_values": 1}


# ------------------------------------------------------------------ (3) invalidation
def test_value_put_before_a_returned_invalidation_must_not_be_read():
    a = put("ns-b/1", 0, 10, 100, seq=1)
    h = History(puts=[a], gets=[read("ns-b/1", 40, 50, a)], invalidations=[inv("ns-b/", 20, 30)])
    found = ch.check_invalidation(h)
    assert len(found) == 1 and "invalidated value read" in found[0]


def test_invalidation_near_misses_pass():
    a = put("ns-b/1", 0, 10, 100, seq=1)
    straddles = put("ns-b/2", 15, 25, 200, seq=2)  # began before the call, ended after
    after = put("ns-b/3", 31, 35, 300, seq=3)
    other = put("ns-a/1", 0, 10, 400, seq=4)
    failed = put("ns-b/4", 0, 10, None, seq=5)
    h = History(
        puts=[a, straddles, after, other, failed],
        gets=[
            read("ns-b/1", 25, 50, a),  # began before invalidate returned
            read("ns-b/2", 40, 50, straddles),  # may have committed under the new epoch
            read("ns-b/3", 40, 50, after),
            read("ns-a/1", 40, 50, other),  # another prefix
            read("ns-b/4", 40, 50, failed),  # may have landed late
            read("ns-b/1", 40, 50),  # the expected miss
        ],
        invalidations=[inv("ns-b/", 20, 30)],
    )
    assert violations(h) == CLEAN


def test_failed_invalidation_promises_nothing():
    a = put("ns-b/1", 0, 10, 100, seq=1)
    h = History(
        puts=[a],
        gets=[read("ns-b/1", 40, 50, a)],
        invalidations=[inv("ns-b/", 20, 30, ok=False)],
    )
    assert ch.check_invalidation(h) == []


def test_the_latest_returned_invalidation_counts():
    a = put("ns-b/1", 0, 10, 100, seq=1)
    b = put("ns-b/1", 30, 35, 200, seq=2)  # after the first invalidation, before the second
    h = History(
        puts=[a, b],
        gets=[read("ns-b/1", 42, 50, b), read("ns-b/1", 60, 70, b)],
        invalidations=[inv("ns-b/", 20, 25), inv("ns-b/", 40, 45)],
    )
    found = ch.check_invalidation(h)
    assert len(found) == 1 and "[60..70]" in found[0]


def test_empty_prefix_invalidates_everything():
    a = put("ns-a/1", 0, 10, 100, seq=1)
    h = History(puts=[a], gets=[read("ns-a/1", 40, 50, a)], invalidations=[inv("", 20, 30)])
    assert len(ch.check_invalidation(h)) == 1


# ------------------------------------------------------------------ version order
def test_version_going_back_is_caught():
    a = put("k", 0, 10, 200, seq=1)
    b = put("k", 20, 30, 100, seq=2)
    found = ch.check_version_order(History(puts=[a, b]))
    assert len(found) == 1 and "went back" in found[0]


def test_duplicate_version_is_caught():
    a = put("k", 0, 10, 100, seq=1)
    b = put("k", 5, 30, 100, seq=2)  # overlapping, but versions are unique
    found = ch.check_version_order(History(puts=[a, b]))
    assert len(found) == 1 and "duplicate" in found[0]


def test_overlapping_puts_may_be_ordered_either_way():
    a = put("k", 0, 20, 200, seq=1)
    b = put("k", 10, 30, 100, seq=2)
    failed = put("k", 40, 50, None, seq=3)
    other = put("j", 40, 50, 50, seq=4)  # versions are per key
    assert ch.check_version_order(History(puts=[a, b, failed, other])) == []


# ------------------------------------------------------------------ parse and summary
def _lines(*records: dict) -> list[str]:
    return [json.dumps(r) for r in records]


def test_parse_joins_put_halves_and_tolerates_a_cut_line():
    lines = [*_lines(
        {"op": "put", "phase": "begin", "worker": "w", "writer": 1, "seq": 0, "key": "k",
         "checksum": "c0", "start": 1},
        {"op": "put", "phase": "begin", "worker": "w", "writer": 1, "seq": 1, "key": "k",
         "checksum": "c1", "start": 5},
        {"op": "put", "phase": "end", "worker": "w", "seq": 0, "end": 3, "version": 9},
        {"op": "put", "phase": "begin", "worker": "w", "writer": 1, "seq": 2, "key": "k",
         "checksum": "c2", "start": 7},
        {"op": "put", "phase": "end", "worker": "w", "seq": 2, "end": 8, "error": "Unavailable: x"},
        {"op": "get", "worker": "r", "key": "k", "start": 4, "end": 6, "found": True,
         "writer": 1, "seq": 0, "checksum": "c0"},
        {"op": "get", "worker": "r", "key": "k", "start": 6, "end": 7, "found": False},
        {"op": "invalidate", "worker": "r", "prefix": "k", "start": 8, "end": 9, "generation": 3},
    ), '{"op": "get", "worker": "r", "ke']  # fmt: skip
    h = ch.parse(lines)
    by_seq = {p.seq: p for p in h.puts}
    assert by_seq[0].completed and by_seq[0].version == 9 and by_seq[0].end == 3
    assert not by_seq[1].completed and by_seq[1].end is None  # no result: failed
    assert not by_seq[2].completed and by_seq[2].error.startswith("Unavailable")
    assert len(h.gets) == 2 and h.put_of(h.gets[0]) is by_seq[0]
    assert h.invalidations == [Invalidate("k", 8, 9, generation=3, worker="r")]


def test_load_reads_every_file(tmp_path):
    (tmp_path / "a.jsonl").write_text(
        "\n".join(_lines({"op": "get", "worker": "r", "key": "k", "start": 1, "end": 2}))
    )
    (tmp_path / "b.jsonl").write_text(
        "\n".join(_lines({"op": "get", "worker": "s", "key": "k", "start": 1, "end": 2}))
    )
    assert len(ch.load(sorted(tmp_path.glob("*.jsonl"))).gets) == 2


def test_summary_counts_and_line():
    a = put("ns-b/1", 0, 10, 100, seq=1)
    failed = put("ns-b/1", 11, 12, None, seq=2)
    b = put("ns-a/1", 0, 10, 100, seq=3)
    h = History(
        puts=[a, failed, b],
        gets=[
            read("ns-b/1", 40, 50, a),  # invalidated value: a violation
            read("ns-b/1", 40, 50),  # expected miss (invalidated)
            read("ns-a/1", 40, 50),  # a miss after a surviving put
            read("ns-a/1", 40, 50, b),
            Get("ns-a/1", 40, 50, error="unexpected KeyError: 'x'"),
        ],
        invalidations=[inv("ns-b/", 20, 30), inv("ns-b/", 31, 32, ok=False)],
    )
    v = ch.check_all(h)
    s = ch.summarize(
        h, v, extra={"node_kills": 3, "etcd_restarts": 1, "processes": 4, "nodes": 4, "replicas": 2}
    )
    assert (s["ops"], s["puts"], s["puts_ok"], s["put_errors"]) == (10, 3, 2, 1)
    assert (s["gets"], s["hits"], s["misses"], s["get_errors"]) == (5, 2, 2, 1)
    assert s["hit_fraction"] == 0.5 and s["unexpected_misses"] == 1
    assert (s["invalidations"], s["invalidations_ok"]) == (2, 1)
    assert s["errors_by_type"] == {"Unavailable": 1, "unexpected KeyError": 1, "E": 1}
    assert s["violations"] == {**CLEAN, "invalidated_reads": 1}
    assert s["span_s"] == pytest.approx(50e-9, abs=0.01)
    line = ch.summary_line(s)
    assert line.startswith("checker: 10 ops")
    assert "from 4 client processes on 4 nodes (R=2)" in line
    assert "under 3 node kill -9+restart(s) and 1 etcd restart(s)" in line
    assert "checked 2 reads against earlier puts, 2 reads after an invalidation;" in line
    assert "violations 1 (" in line
    assert "invalidated_reads (1)" in ch.first(v)
    assert s["coverage"] == {"reads_with_floor": 2, "reads_after_invalidation": 2}


# ------------------------------------------------------------------ the worker's values
def test_worker_values_identify_their_put_and_expose_tearing():
    key_small, key_large = cw.KEYS[0], cw.KEYS[cw.LARGE_INDEX]
    assert cw.is_large(key_large) and not cw.is_large(key_small)
    a, b = cw.make_value(key_large, 1, 7), cw.make_value(key_large, 2, 9)
    assert a.nbytes == 256 * 1024 and a.nbytes > 64 * 1024  # striped at 64 KiB
    assert 2048 <= cw.make_value(key_small, 1, 7).nbytes <= 8192
    assert cw.identify(a) == (1, 7) and cw.identify(None) == (None, None)
    assert cw.checksum(a) == cw.checksum(cw.make_value(key_large, 1, 7))  # deterministic
    torn = a.copy()
    torn[len(a) // 2 :] = b[len(a) // 2 :]  # first stripes of one put, last of another
    assert cw.identify(torn) == (1, 7) and cw.checksum(torn) != cw.checksum(a)
    assert cw.checksum(a[:-1]) != cw.checksum(a)  # truncated
    assert cw.checksum(a.view("<i8")) != cw.checksum(a)  # same bytes, other dtype
    assert cw.checksum(a.reshape(2, -1)) != cw.checksum(a)  # same bytes, other shape
    assert cw.identify(a.astype("<f8")) == (None, None)
