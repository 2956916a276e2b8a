"""The soak's own checks, beside checker_history's: pure functions, violations out.

Unit-tested on hand-made inputs in tests/unit/test_soak_checks.py (each one
shown to fail on a bad input). Inputs are plain records:

* ``check_lost`` takes a checker_history ``History``;
* ``check_deadlines`` takes the raw JSON records of the workers (it must see
  a put's ``begin`` without an ``end``, which ``History`` folds into an error);
* ``check_resources`` takes samples ``{"proc", "kind", "rss", "fds", "t"}``;
* ``check_exits`` takes ``{process name: exit code}``;
* ``check_evictions`` takes ``{node name: evictions}`` (the largest seen).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

try:
    from tests.integration.checker_history import History, Put, _Before, _completed_by_key
except ImportError:  # under a plain `pytest`, tests/ itself (not the repository) is on sys.path
    from integration.checker_history import (  # type: ignore[no-redef]
        History,
        Put,
        _Before,
        _completed_by_key,
    )

MiB = 1024 * 1024


def check_lost(h: History) -> list[str]:
    """Zero lost acknowledged puts: a get that missed a completed put that nothing removed.

    A get of key k that found nothing although a put of k completed before
    the get began, and that put began after every invalidation of a prefix of
    k that could have hit the get (one that began before the get ended). The
    soak never deletes and never fills the budget (evictions are asserted 0),
    so such a miss is an acknowledged put the cluster lost.
    """
    latest: dict[str, _Before] = {}
    last_put: dict[str, dict[int, Put]] = {}
    for key, puts in _completed_by_key(h).items():
        ended = [p for p in puts if p.end is not None]
        latest[key] = _Before((p.end, p.start) for p in ended)  # type: ignore[misc]
        last_put[key] = {p.start: p for p in ended}
    inv = sorted(((i.prefix, i.start, i.end) for i in h.invalidations), key=lambda x: x[1])
    out = []
    for g in h.gets:
        if g.found or g.error or g.key not in latest:
            continue
        last_inv_end = max(
            (end for prefix, start, end in inv if g.key.startswith(prefix) and start < g.end),
            default=-1,
        )
        start = latest[g.key].max_before(g.start)
        if start > last_inv_end:
            p = last_put[g.key][start]
            out.append(
                f"lost put: get {g.key!r} [{g.start}..{g.end}] by {g.worker} missed, but "
                f"put w{p.writer}#{p.seq} v{p.version} [{p.start}..{p.end}] by {p.worker} "
                "completed before it and nothing invalidated it"
            )
    return out


def load_records(paths: Iterable[Path]) -> list[dict[str, Any]]:
    out = []
    for path in paths:
        for line in Path(path).read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue  # a line cut short by a killed worker
    return out


def check_deadlines(records: Iterable[dict[str, Any]], limit_s: float) -> list[str]:
    """No operation hung: each ended, and within ``limit_s`` of its start.

    A put is two records (``begin``, ``end``) matched by (worker, seq); a
    begin without an end means the worker was stopped while the put hung.
    """
    limit = int(limit_s * 1e9)
    out = []
    begins: dict[tuple[str, int], dict[str, Any]] = {}
    for rec in records:
        if rec.get("op") == "put" and rec.get("phase") == "begin":
            begins[(rec["worker"], rec["seq"])] = rec
    for rec in records:
        op = rec.get("op")
        if op == "put":
            if rec.get("phase") != "end":
                continue
            b = begins.pop((rec["worker"], rec["seq"]), None)
            if b is None:
                continue
            start, end, what = b["start"], rec["end"], f"put {b['key']!r}"
        elif op in ("get", "invalidate"):
            start, end = rec["start"], rec["end"]
            what = f"{op} {rec.get('key', rec.get('prefix'))!r}"
        else:
            continue
        if end - start > limit:
            out.append(
                f"hung: {what} by {rec['worker']} took {(end - start) / 1e9:.1f}s "
                f"[{start}..{end}], over the {limit_s:.0f}s deadline"
            )
    out.extend(
        f"hung: put {b['key']!r} by {b['worker']} began at {b['start']} and never ended"
        for b in begins.values()
    )
    return out


def rss_bound(capacity: int, allowance: int) -> int:
    """A node's RSS budget: its byte budget plus 10 %, plus the runtime's own memory."""
    return int(capacity * 1.1) + allowance


def check_resources(
    samples: Iterable[dict[str, Any]], *, rss_limit: int, fd_limit: int, kinds: Iterable[str]
) -> list[str]:
    """Every sample of a process of the given ``kinds`` is within the RSS and fd bounds.

    Reports the worst sample of each process once per bound it broke.
    """
    kinds = set(kinds)
    worst: dict[tuple[str, str], dict[str, Any]] = {}
    for s in samples:
        if s["kind"] not in kinds:
            continue
        for what, limit in (("rss", rss_limit), ("fds", fd_limit)):
            if s[what] > limit and s[what] > worst.get((s["proc"], what), {}).get(what, -1):
                worst[(s["proc"], what)] = s
    out = []
    for (proc, what), s in sorted(worst.items()):
        if what == "rss":
            out.append(
                f"memory: {proc} RSS {s['rss'] / MiB:.0f} MiB at t={s['t']:.0f}s, "
                f"over the bound {rss_limit / MiB:.0f} MiB"
            )
        else:
            out.append(f"fds: {proc} had {s['fds']} open at t={s['t']:.0f}s, over {fd_limit}")
    return out


def check_exits(codes: dict[str, int | None]) -> list[str]:
    """Every process exited by itself with 0 (None: it had to be killed)."""
    return [
        f"exit: {name} " + ("did not exit and was killed" if code is None else f"exited {code}")
        for name, code in sorted(codes.items())
        if code != 0
    ]


def check_evictions(evictions: dict[str, int]) -> list[str]:
    """Nothing was evicted: the budget is sized so, and lost-put checks rely on it."""
    return [
        f"evictions: {name} evicted {n} entries (the soak is sized never to fill a node)"
        for name, n in sorted(evictions.items())
        if n
    ]
