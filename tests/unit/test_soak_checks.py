"""tests/soak/checks.py on hand-made inputs: each check passes a good one and fails a bad one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# pytest puts tests/ on sys.path (tests/ has no __init__.py): these are the names it uses.
from integration.checker_history import Get, History, Invalidate, Put
from soak import checks

pytestmark = pytest.mark.unit

S = 1_000_000_000  # one second in ns


def _put(key: str, seq: int, start: int, end: int | None, version: int | None = None) -> Put:
    return Put(
        writer=1, seq=seq, key=key, checksum=f"c{seq}", start=start, end=end, version=version
    )


def test_lost_put_is_a_miss_after_a_completed_put():
    h = History(puts=[_put("keep/1", 0, 0, 10, 5)], gets=[Get("keep/1", 20, 30, found=False)])
    (msg,) = checks.check_lost(h)
    assert "lost put" in msg and "w1#0" in msg


def test_miss_before_the_put_completed_or_after_invalidation_is_not_lost():
    h = History(
        puts=[_put("ns-b/1", 0, 0, 10, 5), _put("ns-b/2", 1, 0, None)],
        gets=[
            Get("ns-b/1", 5, 30, found=False),  # began before the put ended
            Get("ns-b/1", 50, 60, found=False),  # after invalidate
            Get("ns-b/2", 50, 60, found=False),  # that put failed
            Get("ns-b/1", 50, 60, error="Unavailable: x"),
        ],
        invalidations=[Invalidate("ns-b/", 40, 45, generation=9)],
    )
    assert checks.check_lost(h) == []


def test_deadlines_flag_slow_and_unended_ops():
    recs = [
        {"op": "put", "phase": "begin", "worker": "w", "seq": 0, "key": "k", "start": 0},
        {"op": "put", "phase": "end", "worker": "w", "seq": 0, "end": 2 * S},
        {"op": "put", "phase": "begin", "worker": "w", "seq": 1, "key": "k", "start": 3 * S},
        {"op": "get", "worker": "r", "key": "k", "start": 0, "end": 90 * S},
        {"op": "invalidate", "worker": "r", "prefix": "ns", "start": 0, "end": S},
    ]
    out = checks.check_deadlines(recs, limit_s=60)
    assert len(out) == 2
    assert "get 'k' by r took 90.0s" in out[0]
    assert "never ended" in out[1]
    assert checks.check_deadlines(recs[:2], limit_s=60) == []


def test_resources_bound_rss_and_fds_of_the_given_kinds():
    cap = 100 * checks.MiB
    limit = checks.rss_bound(cap, 50 * checks.MiB)
    assert limit == 160 * checks.MiB
    ok = {"proc": "node-0", "kind": "node", "rss": limit, "fds": 100, "t": 1.0}
    fat = {**ok, "rss": limit + 1, "t": 2.0}
    leaky = {**ok, "fds": 1001, "t": 3.0}
    router = {**fat, "proc": "router-a", "kind": "router"}
    assert (
        checks.check_resources([ok, router], rss_limit=limit, fd_limit=1000, kinds=["node"]) == []
    )
    out = checks.check_resources([ok, fat, leaky], rss_limit=limit, fd_limit=1000, kinds=["node"])
    assert len(out) == 2
    assert any(m.startswith("memory: node-0") for m in out)
    assert any(m.startswith("fds: node-0 had 1001") for m in out)


def test_exits_must_all_be_zero():
    assert checks.check_exits({"node-0": 0, "router-a": 0}) == []
    out = checks.check_exits({"node-0": 0, "node-1": -9, "router-a": None})
    assert out == ["exit: node-1 exited -9", "exit: router-a did not exit and was killed"]


def test_evictions_must_be_zero():
    assert checks.check_evictions({"node-0": 0}) == []
    assert checks.check_evictions({"node-0": 0, "node-1": 3}) == [
        "evictions: node-1 evicted 3 entries (the soak is sized never to fill a node)"
    ]


def _soak(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    root = Path(__file__).resolve().parents[2]
    return subprocess.run(
        [sys.executable, "-m", "tests.soak.run"],
        cwd=root,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_soak_refuses_a_directory_with_an_old_run_in_it(tmp_path):
    """Histories are appended to: an old run's records were checked as the new
    run's (its keys read as lost, its values as torn). Exit 2, start nothing."""
    (tmp_path / "histories").mkdir()
    (tmp_path / "histories" / "writer-0.jsonl").write_text("{}\n")
    done = _soak({"SOAK_DIR": str(tmp_path), "SOAK_SECONDS": "1"})
    assert done.returncode == 2, done.stdout + done.stderr
    assert "is not empty" in done.stdout
    assert (tmp_path / "histories" / "writer-0.jsonl").read_text() == "{}\n"  # left alone


def test_the_soak_refuses_unknown_fault_kinds(tmp_path):
    done = _soak({"SOAK_KINDS": "pause,meteor", "SOAK_DIR": str(tmp_path / "new")})
    assert done.returncode == 2, done.stdout + done.stderr
    assert "meteor" in done.stdout and "pause" in done.stdout
