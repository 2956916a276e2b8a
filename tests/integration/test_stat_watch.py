"""``tensorcache stat --json`` and ``--watch`` against a real cluster.

``--watch`` runs under a pseudo-terminal, as a person would see it: it must
redraw in place (cursor-up and erase-line sequences between frames), show
every node and the cluster total, and stop after ``--count`` refreshes.
"""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time

import numpy as np
import pytest

import tensorcache
from tensorcache.apps.cluster import LocalCluster

pytestmark = pytest.mark.integration


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "tensorcache", *args]


def test_stat_json_has_every_node_and_totals(cluster: LocalCluster, prefix: str) -> None:
    with tensorcache.connect(cluster.router_address) as c:
        for i in range(12):
            c.put(f"{prefix}{i}", np.arange(100))
        c.get(f"{prefix}0")
        c.get(f"{prefix}missing")
    out = subprocess.run(
        _cli("stat", "--router", cluster.router_address, "--json"),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    doc = json.loads(out.stdout)
    assert doc["router"]["state"] == "ok" and doc["router"]["members"] == 3
    names = sorted(n["name"] for n in doc["nodes"])
    assert names == sorted(cluster.nodes)
    total = doc["totals"]
    for field in ("keys", "bytes_used", "capacity", "hits", "misses", "evictions"):
        assert total[field] == sum(n[field] for n in doc["nodes"]), field
    assert total["keys"] >= 12 and total["hits"] >= 1 and total["misses"] >= 1
    assert 0 < total["hit_rate"] < 1
    assert total["utilization"] == pytest.approx(total["bytes_used"] / total["capacity"])


def test_stat_watch_redraws_in_place_and_stops_after_count(cluster: LocalCluster) -> None:
    master, slave = pty.openpty()
    env = {**os.environ, "COLUMNS": "160", "LINES": "40", "TERM": "xterm-256color"}
    proc = subprocess.Popen(
        _cli(
            "stat",
            "--router",
            cluster.router_address,
            "--watch",
            "--count",
            "3",
            "--interval",
            "0.2",
        ),
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=slave,
        env=env,
    )
    os.close(slave)
    out = b""
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
        assert proc.wait(timeout=30) == 0, out.decode(errors="replace")[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    text = out.decode(errors="replace")
    for name in cluster.nodes:
        assert name in text
    assert "total (3/3)" in text
    assert "refresh 3" in text and "refresh 4" not in text
    # Frames 2 and 3 replace the previous one: the cursor goes up and erases.
    assert text.count("\x1b[1A") >= 2 * 5, text[-1500:]
    assert text.index("refresh 1") < text.index("refresh 2") < text.index("refresh 3")
