"""The checker's analysis: a recorded history in, a list of violations out.

Pure functions over plain records, no processes and no pytest, so the unit
tests (tests/unit/test_checker_history.py) feed them hand-made histories
that must pass and must fail.

A history is what the worker processes (checker_worker.py) write, one JSON
object a line, with times from ``time.monotonic_ns()`` (one clock for every
process on the host):

* a writer writes ``{"op": "put", "phase": "begin", "worker", "writer",
  "seq", "key", "checksum", "start"}`` *before* it calls ``put`` and
  ``{"op": "put", "phase": "end", "worker", "seq", "end", "version"}`` (or
  ``"error"`` instead of ``"version"``) after. A begin without an end (the
  worker died in between) is a put that failed;
* a reader writes one line per get: ``{"op": "get", "worker", "key",
  "start", "end", "found"}``, and for a hit the ``writer``, ``seq`` and
  ``checksum`` of what it read (``writer``/``seq`` decoded from the value
  itself, ``checksum`` computed over its dtype, shape and bytes), or
  ``"error"``;
* an invalidation is ``{"op": "invalidate", "worker", "prefix", "start",
  "end", "generation"}`` (or ``"error"``).

What a failed put means: it may or may not have been applied, and if it was,
we do not know its version or when. So its value may be read (it is a put
for the torn-value check), but it is never *completed*: it never makes
another read stale, never takes part in the version order, and a read of it
is never called stale or invalidated.
"""

from __future__ import annotations

import json
from bisect import bisect_left
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path


@dataclass(frozen=True)
class Put:
    writer: int
    seq: int
    key: str
    checksum: str
    start: int
    end: int | None = None  # None: never returned (the worker died)
    version: int | None = None  # set iff the put returned a version
    error: str = ""
    worker: str = ""

    @property
    def completed(self) -> bool:
        return self.version is not None and self.end is not None


@dataclass(frozen=True)
class Get:
    key: str
    start: int
    end: int
    found: bool = False
    writer: int | None = None  # decoded from the value read
    seq: int | None = None
    checksum: str | None = None
    error: str = ""
    worker: str = ""


@dataclass(frozen=True)
class Invalidate:
    prefix: str
    start: int
    end: int
    generation: int | None = None
    error: str = ""
    worker: str = ""

    @property
    def completed(self) -> bool:
        return not self.error


@dataclass
class History:
    puts: list[Put] = field(default_factory=list)
    gets: list[Get] = field(default_factory=list)
    invalidations: list[Invalidate] = field(default_factory=list)
    _ids: dict[tuple[int, int], Put] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def put_of(self, get: Get) -> Put | None:
        """The put whose value ``get`` returned, if it is exactly one that was put there."""
        if not get.found or get.writer is None or get.seq is None:
            return None
        put = self._by_id().get((get.writer, get.seq))
        if put is None or put.key != get.key or put.checksum != get.checksum:
            return None
        return put

    def _by_id(self) -> dict[tuple[int, int], Put]:
        """Puts by (writer, seq), rebuilt when puts were added."""
        if len(self._ids) != len(self.puts):
            self._ids = {(p.writer, p.seq): p for p in self.puts}
        return self._ids


# ------------------------------------------------------------------ loading
def parse(lines: Iterable[str]) -> History:
    """A history from JSON lines (any number of workers, any order)."""
    begins: dict[tuple[str, int], dict] = {}
    ends: dict[tuple[str, int], dict] = {}
    h = History()
    for line in lines:
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut short by a killed worker: its op never finished
        op = rec.get("op")
        if op == "put":
            (begins if rec["phase"] == "begin" else ends)[(rec["worker"], rec["seq"])] = rec
        elif op == "get":
            h.gets.append(
                Get(
                    key=rec["key"],
                    start=rec["start"],
                    end=rec["end"],
                    found=bool(rec.get("found")),
                    writer=rec.get("writer"),
                    seq=rec.get("seq"),
                    checksum=rec.get("checksum"),
                    error=rec.get("error", ""),
                    worker=rec.get("worker", ""),
                )
            )
        elif op == "invalidate":
            h.invalidations.append(
                Invalidate(
                    prefix=rec["prefix"],
                    start=rec["start"],
                    end=rec["end"],
                    generation=rec.get("generation"),
                    error=rec.get("error", ""),
                    worker=rec.get("worker", ""),
                )
            )
    for ident, b in begins.items():
        e = ends.get(ident, {})
        error = e.get("error", "" if e else "no result recorded")
        h.puts.append(
            Put(
                writer=b["writer"],
                seq=b["seq"],
                key=b["key"],
                checksum=b["checksum"],
                start=b["start"],
                end=e.get("end"),
                version=None if error else e.get("version"),
                error=error,
                worker=b["worker"],
            )
        )
    return h


def load(paths: Iterable[Path]) -> History:
    lines: list[str] = []
    for path in paths:
        lines.extend(Path(path).read_text().splitlines())
    return parse(lines)


# ------------------------------------------------------------------ helpers
class _Before:
    """Max of a value over records that ended strictly before a time, per lookup.

    ``items`` are (end, value); ``max_before(t)`` is the largest value whose
    end < t (``default`` if none).
    """

    def __init__(self, items: Iterable[tuple[int, int]], default: int = -1) -> None:
        pairs = sorted(items)
        self._ends = [e for e, _ in pairs]
        self._max = list(accumulate((v for _, v in pairs), max))
        self._default = default

    def max_before(self, t: int) -> int:
        i = bisect_left(self._ends, t)
        return self._max[i - 1] if i else self._default


def _completed_by_key(h: History) -> dict[str, list[Put]]:
    out: dict[str, list[Put]] = defaultdict(list)
    for p in h.puts:
        if p.completed:
            out[p.key].append(p)
    return out


def _end_version(puts: Iterable[Put]) -> list[tuple[int, int]]:
    return [(p.end, p.version) for p in puts if p.end is not None and p.version is not None]


def _describe(p: Put) -> str:
    return f"put {p.key!r} w{p.writer}#{p.seq} v{p.version} [{p.start}..{p.end}]"


# ------------------------------------------------------------------ the checks
def check_no_torn(h: History) -> list[str]:
    """(2) Every value read is, byte for byte, one that was put under that key.

    The reader decodes (writer, seq) from the value and checksums dtype,
    shape and bytes; that put must exist, be for this key, and have been
    recorded with this checksum. A failed put counts: it may have landed.
    A read may also not return a put that began after the read ended.
    """
    out = []
    by_id = h._by_id()
    for g in h.gets:
        if not g.found or g.error:
            continue
        put = h.put_of(g)
        if put is None:
            claimed = by_id.get((g.writer, g.seq)) if g.writer is not None else None
            why = (
                "no put has that (writer, seq)"
                if claimed is None
                else f"that put was {claimed.key!r} with checksum {claimed.checksum}"
            )
            out.append(
                f"torn or foreign value: get {g.key!r} [{g.start}..{g.end}] by {g.worker} read "
                f"w{g.writer}#{g.seq} checksum {g.checksum}, but {why}"
            )
        elif put.start > g.end:
            out.append(
                f"value from the future: get {g.key!r} [{g.start}..{g.end}] by {g.worker} "
                f"returned {_describe(put)}, which began after the get ended"
            )
    return out


def check_fresh_reads(h: History) -> list[str]:
    """(1) No get returns a version older than one whose put completed before it began."""
    out = []
    latest = {key: _Before(_end_version(puts)) for key, puts in _completed_by_key(h).items()}
    for g in h.gets:
        put = h.put_of(g)
        if put is None or not put.completed or put.key not in latest:
            continue
        assert put.version is not None
        floor = latest[put.key].max_before(g.start)
        if put.version < floor:
            out.append(
                f"stale read: get {g.key!r} [{g.start}..{g.end}] by {g.worker} returned "
                f"{_describe(put)}, but version {floor} was put before the get began"
            )
    return out


def check_invalidation(h: History) -> list[str]:
    """(3) After invalidate(prefix) returned, no get returns a value put under prefix before it.

    "Put before it": the put *completed* before invalidate was called. A put
    that overlaps the call may commit under the new epoch and stay visible.
    Only invalidations that returned count; only gets that began after one
    returned are checked.
    """
    out = []
    by_prefix: dict[str, list[Invalidate]] = defaultdict(list)
    for inv in h.invalidations:
        if inv.completed:
            by_prefix[inv.prefix].append(inv)
    # Per prefix: the latest start among invalidations that ended before t.
    latest_start = {p: _Before((i.end, i.start) for i in invs) for p, invs in by_prefix.items()}
    for g in h.gets:
        put = h.put_of(g)
        if put is None or not put.completed or put.end is None:
            continue
        for prefix, before in latest_start.items():
            if not g.key.startswith(prefix):
                continue
            called = before.max_before(g.start)
            if called >= 0 and put.end < called:
                out.append(
                    f"invalidated value read: get {g.key!r} [{g.start}..{g.end}] by {g.worker} "
                    f"returned {_describe(put)}, which completed before invalidate({prefix!r}) "
                    f"was called at {called} (that call returned before the get began)"
                )
    return out


def check_version_order(h: History) -> list[str]:
    """Versions of a key are unique, and a put that began after another completed is newer."""
    out = []
    for key, puts in _completed_by_key(h).items():
        seen = Counter(p.version for p in puts)
        out.extend(
            f"duplicate version: {n} completed puts of {key!r} got version {v}"
            for v, n in seen.items()
            if n > 1
        )
        before = _Before(_end_version(puts))
        for p in puts:
            assert p.version is not None
            floor = before.max_before(p.start)
            if p.version <= floor:
                out.append(
                    f"version went back: {_describe(p)} began after a put of the same key "
                    f"completed with version {floor}"
                )
    return out


CHECKS = {
    "stale_reads": check_fresh_reads,
    "torn_values": check_no_torn,
    "invalidated_reads": check_invalidation,
    "version_order": check_version_order,
}


def check_all(h: History) -> dict[str, list[str]]:
    return {name: fn(h) for name, fn in CHECKS.items()}


# ------------------------------------------------------------------ summary
def coverage(h: History) -> dict[str, int]:
    """How much the checks had to bite on (a run where these are 0 proved nothing).

    ``reads_with_floor``: hits on a completed put, for a key some put of
    which had completed before the get began (check 1 compared something);
    ``reads_after_invalidation``: gets (hit or miss) of a key under a prefix
    whose invalidation returned before the get began (check 3 applied).
    """
    first_end: dict[str, int] = {}
    for p in h.puts:
        if p.completed and p.end is not None:
            first_end[p.key] = min(first_end.get(p.key, p.end), p.end)
    first_inv: dict[str, int] = {}
    for i in h.invalidations:
        if i.completed:
            first_inv[i.prefix] = min(first_inv.get(i.prefix, i.end), i.end)
    with_floor = sum(
        1
        for g in h.gets
        if (p := h.put_of(g)) is not None
        and p.completed
        and first_end.get(g.key, g.start) < g.start
    )
    after_inv = sum(
        1
        for g in h.gets
        if not g.error
        and any(g.key.startswith(pre) and end < g.start for pre, end in first_inv.items())
    )
    return {"reads_with_floor": with_floor, "reads_after_invalidation": after_inv}


def unexpected_misses(h: History) -> int:
    """Gets that missed although a completed put of the key could not have been invalidated.

    Not a violation of (1)-(3) (a miss is no version), but with replicas it
    is data loss: a put completed before the get began, and it began after
    every invalidation of the key's prefixes that could affect the get.
    """
    # Per key: the latest start among completed puts that ended before t.
    latest_start = {
        key: _Before((p.end, p.start) for p in puts if p.end is not None)
        for key, puts in _completed_by_key(h).items()
    }
    n = 0
    for g in h.gets:
        if g.found or g.error or g.key not in latest_start:
            continue
        last_inv_end = max(
            (
                i.end
                for i in h.invalidations
                if g.key.startswith(i.prefix) and i.start < g.end  # could have hit this get
            ),
            default=-1,
        )
        n += latest_start[g.key].max_before(g.start) > last_inv_end
    return n


def summarize(h: History, violations: dict[str, list[str]], *, extra: dict | None = None) -> dict:
    """Counts for the closing line and the JSON report."""
    puts_ok = sum(p.completed for p in h.puts)
    gets_ok = [g for g in h.gets if not g.error]
    hits = sum(g.found for g in gets_ok)
    inv_ok = sum(i.completed for i in h.invalidations)
    errors: Counter[str] = Counter()
    for rec in (*h.puts, *h.gets, *h.invalidations):
        if rec.error:
            errors[rec.error.split(":", 1)[0]] += 1
    starts = [r.start for r in (*h.puts, *h.gets, *h.invalidations)]
    ends = [r.end for r in (*h.puts, *h.gets, *h.invalidations) if r.end is not None]
    summary = {
        "ops": len(h.puts) + len(h.gets) + len(h.invalidations),
        "puts": len(h.puts),
        "puts_ok": puts_ok,
        "put_errors": len(h.puts) - puts_ok,
        "gets": len(h.gets),
        "hits": hits,
        "misses": len(gets_ok) - hits,
        "get_errors": len(h.gets) - len(gets_ok),
        "hit_fraction": round(hits / len(gets_ok), 4) if gets_ok else 0.0,
        "unexpected_misses": unexpected_misses(h),
        "invalidations": len(h.invalidations),
        "invalidations_ok": inv_ok,
        "errors": sum(errors.values()),
        "errors_by_type": dict(errors),
        "span_s": round((max(ends) - min(starts)) / 1e9, 2) if starts and ends else 0.0,
        "violations": {k: len(v) for k, v in violations.items()},
        "coverage": coverage(h),
    }
    summary.update(extra or {})
    return summary


def summary_line(s: dict) -> str:
    """One line for a closing note: setup, faults, counts, what was checked, violations."""
    bad = sum(s["violations"].values())
    v = ", ".join(f"{k} {n}" for k, n in s["violations"].items())
    setup = ""
    if "processes" in s:
        setup = f" from {s['processes']} client processes on {s['nodes']} nodes (R={s['replicas']})"
    faults = ""
    if "node_kills" in s:
        faults = (
            f" under {s['node_kills']} node kill -9+restart(s) and "
            f"{s.get('etcd_restarts', 0)} etcd restart(s)"
        )
    cov = s.get("coverage", {})
    checked = ""
    if cov:
        checked = (
            f"checked {cov['reads_with_floor']} reads against earlier puts, "
            f"{cov['reads_after_invalidation']} reads after an invalidation"
            + (f", {cov['striped_hits']} striped reads" if "striped_hits" in cov else "")
            + "; "
        )
    return (
        f"checker: {s['ops']} ops in {s['span_s']} s{setup}{faults}: "
        f"puts {s['puts']} ({s['put_errors']} failed), "
        f"gets {s['gets']} ({s['hits']} hits, {s['misses']} misses, "
        f"{s['get_errors']} failed; hit fraction {s['hit_fraction']:.2f}; "
        f"{s['unexpected_misses']} misses after a surviving put), "
        f"invalidations {s['invalidations_ok']}/{s['invalidations']}; "
        f"errors {s['errors']} {s['errors_by_type']}; {checked}"
        f"violations {bad} ({v})"
    )


def first(violations: dict[str, list[str]], n: int = 5) -> str:
    """The first ``n`` of each kind, for an assertion message."""
    parts = []
    for kind, msgs in violations.items():
        if msgs:
            parts.append(f"{kind} ({len(msgs)}):\n  " + "\n  ".join(msgs[:n]))
    return "\n".join(parts)
